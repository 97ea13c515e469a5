"""Training: one loop for both engines, with history, checkpoints and resume.

The loop (`Trainer.run`) owns epochs, shuffling, the learning-rate schedule, the
progress display, validation, early stopping and checkpoints. An engine backend
(`cnnlab.engines.torch.backend.TorchBackend` or the NumPy one) owns the math of one
step. Everything random is derived from (seed, epoch, step), so a run resumed from
any checkpoint ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .console import EpochProgress
from .fileformat import atomic_write_bytes, pack, unpack
from .preprocess import make_preprocessing

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")
LOSSES = ("categorical_crossentropy", "sparse_categorical_crossentropy",
          "binary_crossentropy", "mse")
ENGINES = ("auto", "torch", "numpy")
PRECISIONS = ("fp32", "bf16")
CHECKPOINT = "checkpoint.safetensors"


class TrainingError(Exception):
    """A training setting or input that cannot work; one clear message."""


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved; the message says how to resume."""


@dataclass
class TrainConfig:
    """Everything needed to repeat a run (saved as config.json in the run directory)."""
    model: str | None = None              # zoo name or path (CLI); informational from the API
    data: str = "mnist-5k"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0                 # sgd, rmsprop
    nesterov: bool = False
    weight_decay: float | None = None     # None: 0, or 0.01 for adamw
    schedule: str = "constant"
    step_size: int = 10                   # step: epochs between decays
    gamma: float = 0.1                    # step / plateau: decay factor
    warmup: float = 0.3                   # onecycle: fraction of steps warming up
    plateau_patience: int = 5
    min_lr: float = 0.0
    loss: str = "categorical_crossentropy"
    label_smoothing: float = 0.0
    augment: dict | None = None
    standardize: bool = False
    val_split: float = 0.0                # 0: validate on the test split
    early_stopping: dict | None = None    # {"monitor", "patience", "min_delta", "restore_best_weights"}
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"                  # auto: torch when installed, else numpy
    precision: str = "fp32"
    channels_last: bool = True
    out: str | None = None
    verbose: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"unknown training option(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(sorted(names))}")
        return cls(**d)

    def check(self):
        def need(cond, msg):
            if not cond:
                raise TrainingError(msg)
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be >= 1, got {self.batch_size}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; allowed: "
                                           f"{', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; allowed: "
                                         f"{', '.join(SCHEDULES)}")
        need(self.loss in LOSSES, f"unknown loss {self.loss!r}; allowed: {', '.join(LOSSES)}")
        need(self.engine in ENGINES, f"unknown engine {self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.engine == "auto":
            from .engines import torch_available
            self.engine = "torch" if torch_available() else "numpy"
        need(self.weight_decay is None or self.weight_decay >= 0, "weight_decay must be >= 0")
        need(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "nesterov needs the sgd optimizer and a momentum > 0 (e.g. --momentum 0.9)")
        need(self.precision in PRECISIONS, f"unknown precision {self.precision!r}; allowed: "
                                           f"{', '.join(PRECISIONS)}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        need(0 <= self.val_split < 1, f"val_split must be in [0, 1), got {self.val_split}")
        need(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        if self.early_stopping is not None:
            es = {"monitor": "val_loss", "patience": 3, "min_delta": 0.0,
                  "restore_best_weights": True, **self.early_stopping}
            need(set(es) == {"monitor", "patience", "min_delta", "restore_best_weights"},
                 "early_stopping takes monitor, patience, min_delta, restore_best_weights")
            need(es["monitor"] in ("loss", "accuracy", "val_loss", "val_accuracy"),
                 "early_stopping monitor must be loss, accuracy, val_loss or val_accuracy")
            self.early_stopping = es
        if self.augment:
            from .augment import check_augment
            try:
                self.augment = check_augment(self.augment)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        return self


# learning-rate schedules (engine-agnostic: the loop sets the engine's lr each step) ----
def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int, epoch: int,
                 plateau_factor: float = 1.0) -> float:
    """lr for global step `step` (0-based).
    step:     lr * gamma ** (epoch // step_size)
    cosine:   min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2, t = step / total
    onecycle: linear warm-up from lr/25 to lr over `warmup` of the steps, then cosine
              down to lr/1e4 (PyTorch OneCycleLR's shape)
    plateau:  lr * factor, the factor shrinking by gamma when the monitor stalls"""
    lr = cfg.lr
    if cfg.schedule == "step":
        return lr * cfg.gamma ** (epoch // max(cfg.step_size, 1))
    if cfg.schedule == "cosine":
        t = step / max(total_steps, 1)
        return cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        warm = max(int(cfg.warmup * total_steps), 1)
        if step < warm:
            return lr / 25 + (lr - lr / 25) * step / warm
        t = (step - warm) / max(total_steps - warm, 1)
        return lr / 1e4 + (lr - lr / 1e4) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "plateau":
        return max(lr * plateau_factor, cfg.min_lr)
    return lr


def resolve_loss(loss: str, model) -> str:
    """What a loss name means for this model's output, the same in both engines:
    'softmax_ce' (softmax cross-entropy), 'sigmoid_bce' (binary cross-entropy on a 1-unit
    sigmoid; categorical cross-entropy on such an output means the same), or 'mse'
    (squared error between probabilities and targets)."""
    act, units = model.output_activation, model.output_shape[-1]
    if act == "sigmoid" and units > 1:
        raise TrainingError(f"a sigmoid output with {units} units means multi-label "
                            "classification, which cnnlab does not train; end with "
                            f"Dense({units}, activation='softmax')")
    if loss == "mse":
        return "mse"
    if loss == "binary_crossentropy" and act != "sigmoid":
        raise TrainingError("binary_crossentropy needs a 1-unit sigmoid output: "
                            "Dense(1, activation='sigmoid')")
    return "sigmoid_bce" if act == "sigmoid" else "softmax_ce"


def optimizer_options(cfg) -> dict:
    """The optimizer settings of a config, as both engines read them (PyTorch semantics;
    AdamW's weight decay defaults to 0.01 when not given)."""
    wd = cfg.weight_decay
    if cfg.optimizer == "sgd":
        return {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": wd or 0.0}
    if cfg.optimizer == "adamw":
        return {"weight_decay": 0.01 if wd is None else wd}
    if cfg.optimizer == "rmsprop":
        return {"momentum": cfg.momentum, "weight_decay": wd or 0.0}
    return {"weight_decay": wd or 0.0}


def step_seed(seed: int, epoch: int, step: int = -1) -> int:
    """A distinct 63-bit seed for each (seed, epoch, step); step >= -2."""
    state = np.random.SeedSequence([seed, epoch, step + 2]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


# data preparation --------------------------------------------------------------------
@dataclass
class Prepared:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: list
    name: str
    val_source: str = ""
    preprocessing: dict = field(default_factory=dict)


def prepare_data(data, cfg: TrainConfig, input_shape) -> Prepared:
    """Load the dataset, split validation data, compute standardization statistics."""
    from . import datasets
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if y.ndim == 2:   # one-hot rows, as Keras' to_categorical makes them
            y = y.argmax(1)
        if y.ndim != 1 or len(y) != len(x):
            raise TrainingError(f"labels must be (N,) integers or (N, classes) one-hot rows "
                                f"for {len(x)} images, got shape {np.shape(data[1])}")
        y = y.astype(np.int64)
        if x.dtype != np.uint8:
            x = np.asarray(x, np.float32)
            if x.size and (x.min() < 0 or x.max() > 1):
                raise TrainingError(f"float images must be in [0, 1] (got {x.min():g} .. "
                                    f"{x.max():g}); pass uint8 pixels or divide by 255")
            x = np.round(x * 255).astype(np.uint8)
        if x.ndim == 3:
            x = x[..., None]
        n_cls = int(y.max()) + 1 if len(y) else 0
        ds_name, xt, yt, xs, ys = "arrays", x, y, None, None
        class_names = [str(i) for i in range(n_cls)]
    else:
        if isinstance(data, (str, os.PathLike)):
            ds = datasets.load(str(data), data_dir=cfg.data_dir,
                               image_size=tuple(input_shape[:2]),
                               color="grayscale" if input_shape[2] == 1 else "rgb")
        else:
            ds = data
        ds_name, xt, yt, xs, ys = ds.name, ds.x_train, ds.y_train, ds.x_test, ds.y_test
        class_names = list(ds.class_names)
    if tuple(xt.shape[1:]) != tuple(input_shape):
        raise TrainingError(f"the data's images are {'x'.join(map(str, xt.shape[1:]))} but the "
                            f"model expects {'x'.join(map(str, input_shape))}; build the model "
                            f"with Input(shape={tuple(xt.shape[1:])})")
    if cfg.val_split > 0:
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(len(xt))
        n_val = max(1, int(round(len(xt) * cfg.val_split)))
        vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        xv, yv, xt, yt = xt[vi], yt[vi], xt[ti], yt[ti]
        val_source = f"{len(xv):,} images split from the training data ({cfg.val_split:g})"
    elif xs is not None:
        xv, yv = xs, ys
        val_source = "the test split (as the tutorials do)"
    else:
        xv = yv = None
        val_source = "none"
    if cfg.standardize:
        mean, std = datasets.channel_stats(xt)
        prep = make_preprocessing(mean, np.maximum(std, 1e-3), input_shape[2])
    else:
        prep = make_preprocessing(channels=input_shape[2])
    return Prepared(xt, yt.astype(np.int64), xv, None if yv is None else yv.astype(np.int64),
                    xs, None if ys is None else ys.astype(np.int64), class_names, ds_name,
                    val_source, prep)


# the loop -----------------------------------------------------------------------------
class _Stop(Exception):
    pass


class StopRequest:
    """Ctrl-C sets a flag that the loop reads between steps, so a checkpoint never holds
    half a step (BatchNorm statistics or RNG already moved, parameters half updated).
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _better(monitor, value, best, min_delta):
    if best is None:
        return True
    if "accuracy" in monitor:
        return value > best + min_delta
    return value < best - min_delta


class Trainer:
    def __init__(self, model, cfg: TrainConfig, data: Prepared, run_dir: Path | None,
                 backend=None):
        self.model, self.cfg, self.data, self.run_dir = model, cfg, data, run_dir
        n_cls = model.num_classes
        if len(data.class_names) > n_cls or (len(data.y_train) and data.y_train.max() >= n_cls):
            raise TrainingError(f"the data has {len(data.class_names)} classes but the model's "
                                f"output has {n_cls}; use Dense({len(data.class_names)}) last")
        resolve_loss(cfg.loss, model)
        self.backend = backend or make_backend(model, cfg, data)
        self.steps = max(1, math.ceil(len(data.x_train) / cfg.batch_size))
        self.total_steps = self.steps * cfg.epochs
        self.history: list[dict] = []
        self.epoch = 0
        self.step_in_epoch = 0
        self.partial = [0.0, 0.0, 0.0, 0]    # loss sum, correct, top5 correct, seen
        self.plateau = {"factor": 1.0, "best": None, "wait": 0}
        self.stopper = {"best": None, "wait": 0, "best_epoch": None}
        self.best_weights = None
        self.stopped_early = False

    # state ------------------------------------------------------------------
    def _state_json(self):
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "partial": self.partial, "history": self.history, "plateau": self.plateau,
                "stopper": self.stopper, "stopped_early": self.stopped_early,
                "config": asdict(self.cfg)}

    def save_checkpoint(self):
        if self.run_dir is None:
            return None
        tensors, backend_json = self.backend.state()
        if self.best_weights is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_weights.items()})
        meta = {"format": "cnnlab-checkpoint", "trainer": self._state_json(),
                "backend": backend_json, "model": self.model.get_config(),
                "meta": self.model.meta}
        path = self.run_dir / CHECKPOINT
        atomic_write_bytes(path, pack(tensors, meta))
        return path

    def load_checkpoint(self, path):
        tensors, meta = unpack(path)
        if meta.get("format") != "cnnlab-checkpoint":
            raise TrainingError(f"{path}: not a cnnlab checkpoint")
        st = meta["trainer"]
        self.epoch, self.step_in_epoch = st["epoch"], st["step_in_epoch"]
        self.partial, self.history = st["partial"], st["history"]
        self.plateau, self.stopper = st["plateau"], st["stopper"]
        self.stopped_early = st.get("stopped_early", False)
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.best_weights = best or None
        self.backend.load_state({k: v for k, v in tensors.items() if not k.startswith("best.")},
                                meta["backend"])

    # epochs -----------------------------------------------------------------
    def _logs(self, sums):
        loss_sum, correct, top5, seen = sums
        logs = {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)}
        if self.model.num_classes > 5:
            logs["top5_accuracy"] = top5 / max(seen, 1)
        return logs

    def run(self):
        cfg, be = self.cfg, self.backend
        progress = EpochProgress(cfg.epochs, self.steps, cfg.verbose)
        with StopRequest() as stop:
            try:
                self._epochs(progress, stop)
            except _Stop:
                progress.close()
                self.partial = be.collect(self.partial)
                path = self.save_checkpoint()
                self._write_history()
                where = f"epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.steps}"
                if path is None:
                    raise TrainingInterrupted(f"interrupted at {where}; no run directory, "
                                              "nothing saved") from None
                self._write_model()
                raise TrainingInterrupted(
                    f"interrupted at {where}; checkpoint saved to {path}\n"
                    f"resume with: cnnlab train --resume {self.run_dir}") from None
            except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keep the last checkpoint
                progress.close()
                ckpt = None if self.run_dir is None else self.run_dir / CHECKPOINT
                if ckpt is not None and ckpt.exists():
                    raise TrainingInterrupted(
                        f"stopped at once; the checkpoint of the last finished epoch is in "
                        f"{ckpt}\nresume with: cnnlab train --resume {self.run_dir}") from None
                raise TrainingInterrupted("stopped at once; nothing saved") from None
        if self.best_weights is not None and (self.cfg.early_stopping or {}).get(
                "restore_best_weights"):
            be.set_weights(self.best_weights)
        self.model.set_weights(be.export_weights())
        return self.history

    def _epochs(self, progress, stop):
        cfg, d, be = self.cfg, self.data, self.backend
        while self.epoch < cfg.epochs and not self.stopped_early:
            epoch = self.epoch
            perm = np.random.default_rng(step_seed(cfg.seed, epoch)).permutation(len(d.x_train))
            if self.step_in_epoch == 0:
                self.partial = [0.0, 0.0, 0.0, 0]
                be.seed_epoch(step_seed(cfg.seed, epoch, -2))
            t0 = time.perf_counter()
            progress.start_epoch(epoch, self.step_in_epoch)
            while self.step_in_epoch < self.steps:
                if stop.requested:   # only ever between two steps
                    raise _Stop
                s = self.step_in_epoch
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                be.set_lr(scheduled_lr(cfg, epoch * self.steps + s, self.total_steps, epoch,
                                       self.plateau["factor"]))
                be.train_step(idx, step_seed(cfg.seed, epoch, s))
                self.step_in_epoch = s + 1
                if progress._progress is not None and (s % 10 == 9 or s + 1 == self.steps):
                    self.partial = be.collect(self.partial)
                    progress.update(s + 1, self._logs(self.partial))
            self.partial = be.collect(self.partial)
            logs = self._logs(self.partial)
            if d.x_val is not None:
                v = be.evaluate(d.x_val, d.y_val)
                logs.update({"val_" + k: val for k, val in v.items()})
            logs["lr"] = be.lr
            logs["seconds"] = round(time.perf_counter() - t0, 3)
            progress.end_epoch({k: v for k, v in logs.items() if k != "seconds"})
            self.history.append({"epoch": epoch + 1, **logs})
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self._after_epoch(logs)
            self.save_checkpoint()
            self._write_history()

    def _after_epoch(self, logs):
        cfg = self.cfg
        if cfg.schedule == "plateau":
            mon = "val_loss" if "val_loss" in logs else "loss"
            p = self.plateau
            if _better(mon, logs[mon], p["best"], 1e-4):
                p["best"], p["wait"] = logs[mon], 0
            else:
                p["wait"] += 1
                if p["wait"] >= cfg.plateau_patience:
                    p["factor"] *= cfg.gamma
                    p["wait"] = 0
        es = cfg.early_stopping
        if es:
            mon = es["monitor"]
            if mon not in logs:
                raise TrainingError(f"early stopping monitors {mon!r}, which this run does not "
                                    f"report (no validation data?)")
            st = self.stopper
            if _better(mon, logs[mon], st["best"], es["min_delta"]):
                st.update(best=logs[mon], wait=0, best_epoch=self.epoch)
                if es["restore_best_weights"]:
                    self.best_weights = self.backend.export_weights()
            else:
                st["wait"] += 1
                if st["wait"] >= es["patience"]:  # Keras: patience 0 stops at once
                    self.stopped_early = True
                    if cfg.verbose:
                        print(f"Early stopping: {mon} has not improved for {st['wait']} epochs "
                              f"(best {st['best']:.4f} at epoch {st['best_epoch']})")

    def _write_history(self):
        if self.run_dir is None or not self.history:
            return
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        import io
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        atomic_write_bytes(self.run_dir / "history.csv", buf.getvalue().encode())

    def _write_model(self):
        self.model.set_weights(self.backend.export_weights())
        self.model.meta["training"] = {"dataset": self.cfg.data, "epochs": self.epoch,
                                       "engine": self.cfg.engine, "interrupted": True}
        self.model.save(self.run_dir / "model.safetensors")


def make_backend(model, cfg, data):
    if cfg.engine == "numpy":
        from .engines.numpy.backend import NumpyBackend
        return NumpyBackend(model, cfg, data)
    from .engines.torch.backend import TorchBackend
    return TorchBackend(model, cfg, data)


def default_run_dir(cfg: TrainConfig, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = Path(str(cfg.data)).name or "data"
    return Path("runs") / f"{model_name}-{data}-{stamp}"


def _environment():
    env = {"cnnlab": __version__, "python": platform.python_version(),
           "numpy": np.__version__, "machine": platform.machine()}
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def fit(model, data="mnist-5k", /, *, resume: str | os.PathLike | None = None, **options):
    """Train `model` in place on `data` and return the history (a list of per-epoch dicts).

    With `out=` (or from the CLI) a run directory receives config.json, history.csv,
    checkpoint.safetensors after every epoch, and model.safetensors at the end.
    """
    if resume is not None:
        return resume_run(resume, model=model)
    options.setdefault("data", _data_name(data))
    cfg = TrainConfig.from_dict(options).check()
    prepared = prepare_data(data, cfg, model.input_shape)
    if model.fresh:  # a new model starts from seeded weights; a trained one continues
        model.init_weights(cfg.seed)
    model.meta.update({"class_names": prepared.class_names,
                       "preprocessing": prepared.preprocessing})
    run_dir = Path(cfg.out) if cfg.out else None
    trainer = Trainer(model, cfg, prepared, run_dir)   # checks everything before writing
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {"train": asdict(cfg), "model": model.get_config(),
                  "environment": _environment()}
        atomic_write_bytes(run_dir / "config.json", json.dumps(config, indent=2).encode())
    if cfg.verbose:
        print(f"Training {model.name} on {prepared.name}: {len(prepared.x_train):,} images, "
              f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, "
              f"engine {cfg.engine}")
        print(f"Validation: {prepared.val_source}")
        if cfg.val_split == 0 and (cfg.early_stopping or cfg.schedule == "plateau"):
            print("Note: early stopping / plateau decisions then look at the test split, so the "
                  "final test accuracy is optimistic; --val-split 0.1 keeps it honest")
        print(f"Device: {trainer.backend.device_info}")
    return _finish(trainer)


def _data_name(data) -> str:
    """How config.json names the data: a dataset name, or a folder's absolute path."""
    from .datasets import DATASETS
    if isinstance(data, (tuple, list)):
        return "arrays"
    if isinstance(data, (str, os.PathLike)):
        name = str(data)
    else:
        name = data.name if data.name in DATASETS else str(getattr(data, "source", data.name))
    if name not in DATASETS and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def resume_run(run_dir, model=None):
    """Continue a run from its checkpoint; the result equals an uninterrupted run."""
    from .model import Sequential
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.exists():
        raise TrainingError(f"{run_dir}: no {CHECKPOINT} to resume from")
    _, meta = unpack(ckpt)
    if meta.get("format") != "cnnlab-checkpoint":
        raise TrainingError(f"{ckpt}: not a cnnlab checkpoint")
    cfg = TrainConfig.from_dict(meta["trainer"]["config"]).check()
    if model is None:
        model = Sequential.from_config(meta["model"])
    model.meta.update(meta.get("meta", {}))
    prepared = prepare_data(cfg.data if cfg.data != "arrays" else None, cfg, model.input_shape) \
        if cfg.data != "arrays" else None
    if prepared is None:
        raise TrainingError("a run trained on in-memory arrays cannot be resumed from the CLI")
    prepared.preprocessing = model.meta.get("preprocessing", prepared.preprocessing)
    trainer = Trainer(model, cfg, prepared, run_dir)
    trainer.load_checkpoint(ckpt)
    if cfg.verbose:
        print(f"Resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}")
    return _finish(trainer)


def _finish(trainer: Trainer):
    model, cfg, d = trainer.model, trainer.cfg, trainer.data
    history = trainer.run()
    summary = {"dataset": cfg.data if cfg.data != "arrays" else d.name,
               "epochs": len(history), "engine": cfg.engine,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "train_images": int(len(d.x_train))}
    if d.x_test is not None:
        res = trainer.backend.evaluate(d.x_test, d.y_test)
        summary["test_accuracy"] = round(float(res["accuracy"]), 6)
        summary["test_loss"] = round(float(res["loss"]), 6)
        if cfg.verbose:
            print(f"Test accuracy: {res['accuracy']:.4f} (loss {res['loss']:.4f}) on "
                  f"{len(d.x_test):,} test images")
    model.meta["training"] = summary
    if trainer.run_dir is not None:
        path = model.save(trainer.run_dir / "model.safetensors")
        if cfg.verbose:
            print(f"Saved {path}")
    return history

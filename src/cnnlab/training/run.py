"""A run: its directory and files, `fit` and `resume_run`.

With `out=` (always from the CLI) a run directory receives config.json, history.csv,
checkpoint.safetensors after every epoch, and model.safetensors at the end (and on
Ctrl-C). Every file is written atomically. A resume brings every file up to date, also
for a run that had already finished. With several ranks only rank 0 prints and writes;
the others take part in the collectives (a checkpoint gathers every rank's RNG state).
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..version import __version__
from ..fileformat import atomic_write_bytes, pack, save, unpack
from ..model import Model
from .config import TrainConfig, TrainingError, TrainingInterrupted
from .data import data_name, prepare_data
from .distributed import current
from .loop import Stop, Trainer
from .tricks import init_model

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "cnnlab-checkpoint"


class History(list):
    """What `fit` returns, as Keras' History: `.history` maps each metric to its values per
    epoch, `.epoch` lists the epochs (0-based); it is also the list of per-epoch dicts."""

    @property
    def history(self) -> dict[str, list]:
        keys = dict.fromkeys(k for row in self for k in row if k != "epoch")
        return {k: [row.get(k) for row in self] for k in keys}

    @property
    def epoch(self) -> list[int]:
        return [row["epoch"] - 1 for row in self]

    @property
    def params(self) -> dict:
        return {"epochs": len(self)}


class Run:
    """The files of a run directory (or none, for a run without `out`)."""

    def __init__(self, trainer: Trainer, run_dir: Path | None):
        self.trainer, self.dir = trainer, run_dir
        self.main = trainer.world.is_main
        trainer.on_epoch_end = lambda t: self.save_epoch()
        trainer.on_interrupt = lambda t: self.save_interrupted()

    @property
    def checkpoint(self) -> Path | None:
        return None if self.dir is None else self.dir / CHECKPOINT

    def write_config(self):
        if not self.main:
            return
        t = self.trainer
        config = {"train": asdict(t.cfg), "model": t.model.get_config(),
                  "environment": environment()}
        choice = getattr(t.backend, "precision", None)
        if choice is not None:   # what `auto` (or the flag) chose, and why
            config["precision"] = {"chosen": choice.precision, "reason": choice.reason}
        atomic_write_bytes(self.dir / "config.json", json.dumps(config, indent=2).encode())

    def save_checkpoint(self):
        t = self.trainer
        tensors, backend_json = t.backend.state()
        if t.lookahead is not None:
            tensors.update(t.lookahead.tensors())
        if t.best_weights is not None:
            tensors.update({f"best.{k}": v for k, v in t.best_weights.items()})
        config = asdict(t.cfg)
        choice = getattr(t.backend, "precision", None)
        if choice is not None:   # a resumed run keeps what `auto` chose, on any machine
            config["precision"] = choice.precision
        meta = {"format": CHECKPOINT_FORMAT,
                "trainer": {**t.state_json(), "config": config},
                "backend": backend_json, "model": t.model.get_config(), "meta": t.model.meta}
        if self.main:
            atomic_write_bytes(self.checkpoint, pack(tensors, meta))

    def load_checkpoint(self):
        tensors, meta = read_checkpoint(self.checkpoint)
        t = self.trainer
        t.load_state_json(meta["trainer"])
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        t.best_weights = best or None
        if t.lookahead is not None:
            t.lookahead.load_tensors(tensors)
        t.backend.load_state({k: v for k, v in tensors.items() if not k.startswith("best.")},
                             meta["backend"])

    def write_history(self):
        history = self.trainer.history
        if self.dir is None or not history or not self.main:
            return
        keys = list(dict.fromkeys(k for row in history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
        atomic_write_bytes(self.dir / "history.csv", buf.getvalue().encode())

    def save_epoch(self):
        if self.dir is not None:
            self.save_checkpoint()
            self.write_history()

    def save_interrupted(self):
        """After Ctrl-C between two steps: checkpoint, history and the model so far."""
        if self.dir is None:
            return
        t = self.trainer
        self.save_checkpoint()
        self.write_history()
        if not self.main:
            return
        t.model.set_weights(t.backend.export_weights())
        t.model.meta["training"] = {"dataset": t.cfg.data, "epochs": t.epoch,
                                    "engine": t.cfg.engine, "interrupted": True}
        save(t.model, self.dir / "model.safetensors")

    def interrupted_message(self, at_once: bool) -> str:
        t = self.trainer
        ranks = f" --nproc {t.world.size}" if t.world.size > 1 else ""
        if at_once:
            if self.checkpoint is not None and self.checkpoint.exists():
                return (f"stopped at once; the checkpoint of the last finished epoch is in "
                        f"{self.checkpoint}\nresume with: cnnlab train --resume {self.dir}{ranks}")
            return "stopped at once; nothing saved"
        where = f"epoch {t.epoch + 1}, step {t.step_in_epoch}/{t.steps}"
        if self.dir is None:
            return f"interrupted at {where}; no run directory, nothing saved"
        return (f"interrupted at {where}; checkpoint saved to {self.checkpoint}\n"
                f"resume with: cnnlab train --resume {self.dir}{ranks}")

    def train(self) -> list[dict]:
        """Run the trainer to the end, then evaluate on the test split and save the model."""
        t = self.trainer
        try:
            history = t.run()
        except Stop:
            raise TrainingInterrupted(self.interrupted_message(at_once=False)) from None
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.interrupted_message(at_once=True)) from None
        self.finish()
        return History(history)

    def finish(self):
        t = self.trainer
        model, cfg, d = t.model, t.cfg, t.data
        if not self.main:
            return
        summary = {"dataset": cfg.data if cfg.data != "arrays" else d.name,
                   "epochs": len(t.history), "engine": cfg.engine,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "train_images": int(len(d.x_train)), "loss": cfg.loss}
        if d.x_test is not None:
            res = t.backend.evaluate(d.x_test, d.y_test)
            summary["test_accuracy"] = round(float(res["accuracy"]), 6)
            summary["test_loss"] = round(float(res["loss"]), 6)
            if cfg.verbose:
                print(f"Test accuracy: {res['accuracy']:.4f} (loss {res['loss']:.4f}, "
                      f"{cfg.loss}) on {len(d.x_test):,} test images")
        model.meta["training"] = summary
        model.meta["loss"] = cfg.loss
        if self.dir is not None:
            self.write_history()
            path = save(model, self.dir / "model.safetensors")
            if cfg.verbose:
                print(f"Saved {path}")


def read_checkpoint(path: Path):
    if path is None or not path.exists():
        raise TrainingError(f"{path.parent if path else 'run'}: no {CHECKPOINT} to resume from")
    tensors, meta = unpack(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a cnnlab checkpoint")
    return tensors, meta


def environment() -> dict:
    env = {"cnnlab": __version__, "python": platform.python_version(),
           "numpy": np.__version__, "machine": platform.machine()}
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def default_run_dir(cfg: TrainConfig, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = Path(str(cfg.data)).name or "data"
    return Path("runs") / f"{model_name}-{data}-{stamp}"


def fit(model, data="mnist-5k", /, *, resume: str | os.PathLike | None = None,
        validation_data=None, callbacks=(), **options):
    """Train `model` in place on `data`; returns a History (Keras' `.history` dict of lists,
    and the list of per-epoch dicts).

    data: a dataset name, a folder, a Dataset, or an (x, y) pair of arrays. Options are
    the fields of TrainConfig. A new model starts from weights seeded by `seed`; a trained
    one continues from its weights. validation_data: an (x, y) pair to validate on;
    callbacks: `cnnlab.callbacks` objects (Keras' EarlyStopping, ModelCheckpoint, ...).
    """
    if resume is not None:   # the run's own settings hold; only epochs may extend it
        extra = sorted(set(options) - {"epochs", "verbose"})
        if extra or validation_data is not None or callbacks:
            given = extra + (["validation_data"] if validation_data is not None else []) + \
                (["callbacks"] if callbacks else [])
            raise TrainingError(f"a resumed run keeps its own settings; {', '.join(given)} "
                                f"cannot change (resume=..., epochs=N may extend it)")
        return resume_run(resume, model=model, epochs=options.get("epochs"))
    options.setdefault("data", data_name(data))
    cfg = TrainConfig.from_dict(options).check()
    prepared = prepare_data(data, cfg, model.input_shape, validation_data)
    init_notes = []
    if model.fresh:  # a new model starts from seeded weights; a trained one continues
        model.init_weights(cfg.seed)
        init_notes = init_model(model, cfg, prepared.x_train, prepared.preprocessing)
    model.meta.update({"class_names": prepared.class_names,
                       "preprocessing": prepared.preprocessing})
    run_dir = Path(cfg.out) if cfg.out else None
    trainer = Trainer(model, cfg, prepared, callbacks=callbacks)  # checks all before writing
    run = Run(trainer, run_dir)
    if run_dir is not None and run.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.write_config()
    if cfg.verbose and run.main:
        print(f"Training {model.name} on {prepared.name}: {len(prepared.x_train):,} images, "
              f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, batch {cfg.batch_size}, "
              f"{cfg.optimizer} lr {cfg.lr:g}, engine {trainer.backend.name}")
        for note in prepared.notes:
            print(f"Data: {note}")
        print(f"Validation: {prepared.val_source}")
        if cfg.val_split == 0 and (cfg.early_stopping or cfg.schedule == "plateau"):
            print("Note: early stopping / plateau decisions then look at the test split, so the "
                  "final test accuracy is optimistic; --val-split 0.1 keeps it honest")
        print(f"Device: {trainer.backend.device_info}")
        if init_notes:
            print(f"Init: {'; '.join(init_notes)}")
    return run.train()


def resume_run(run_dir, model=None, epochs: int | None = None):
    """Continue a run from its checkpoint; the result equals an uninterrupted run.

    epochs: extend the run to this many epochs in all (the schedule is then that of the
    longer run). A finished run is not trained further; its files are brought up to date."""
    run_dir = Path(run_dir)
    _, meta = read_checkpoint(run_dir / CHECKPOINT)
    cfg = TrainConfig.from_dict(meta["trainer"]["config"]).check()
    if not current().is_main:
        cfg.verbose = 0   # not saved: only rank 0 writes the checkpoint
    if cfg.data == "arrays":
        raise TrainingError("a run trained on in-memory arrays cannot be resumed from the CLI")
    done = meta["trainer"]["epoch"]
    if epochs is not None:
        if epochs < done:
            raise TrainingError(f"{run_dir} has already trained {done} epochs; "
                                f"--epochs {epochs} would be fewer")
        if epochs != cfg.epochs and cfg.verbose:
            print(f"Extending {run_dir} from {cfg.epochs} to {epochs} epochs")
        cfg.epochs = epochs
    if model is None:
        model = Model.from_config(meta["model"])
    model.meta.update(meta.get("meta", {}))
    prepared = prepare_data(cfg.data, cfg, model.input_shape)
    prepared.preprocessing = model.meta.get("preprocessing", prepared.preprocessing)
    trainer = Trainer(model, cfg, prepared)
    run = Run(trainer, run_dir)
    run.load_checkpoint()
    if trainer.finished:
        if cfg.verbose:
            print(f"{run_dir}: already finished ({trainer.epoch} epochs); its files are "
                  f"up to date" + (" now" if epochs is None else ""))
        if epochs is not None and trainer.epoch > 0:
            run.save_checkpoint()
        run.write_config()
        model.set_weights(trainer.backend.export_weights())
        if (trainer.cfg.early_stopping or {}).get("restore_best_weights") and \
                trainer.best_weights is not None:
            model.set_weights(trainer.best_weights)
        run.finish()
        return History(trainer.history)
    if cfg.verbose:
        print(f"Resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}")
        ranks = meta["backend"].get("ranks", 1)
        if ranks != trainer.world.size:
            print(f"Note: trained so far on {ranks} rank{'s' if ranks > 1 else ''}, now "
                  f"{trainer.world.size}: the run continues correctly, not bit-identically")
    if epochs is not None:
        run.write_config()
    return run.train()

"""The training loop (`Trainer`), the same for both engines.

The loop owns epochs, shuffling, the learning-rate schedule, the progress display,
validation, early stopping, the plateau schedule and Ctrl-C. A backend
(`cnnlab.engines.torch.backend.TorchBackend` or `cnnlab.engines.numpy.backend.NumpyBackend`)
owns the math of one step; the Trainer resolves the loss and the optimizer once and hands
them to it. Everything random is derived from (seed, epoch, step), so a run resumed from
any checkpoint ends with the same weights as an uninterrupted one. Writing files is the
run's job (`cnnlab.training.run`), through the `on_epoch_end` / `on_interrupt` hooks.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time

import numpy as np

from ..augment import alternating_flip
from ..console import EpochProgress, duration
from ..engines.base import Tally, resolve_engine
from ..hardware import choose_precision, cpu_flags
from ..losses import LossError, resolve_loss
from .config import TrainConfig, TrainingError, bigger_is_better, param_groups, scheduled_lr
from . import distributed
from .data import Prepared
from .tricks import Lookahead


def step_seed(seed: int, epoch: int, step: int = -1) -> int:
    """A distinct 63-bit seed for each (seed, epoch, step); step >= -2."""
    state = np.random.SeedSequence([seed, epoch, step + 2]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class Stop(Exception):
    """Raised between two steps after a Ctrl-C."""


class StopRequest:
    """Ctrl-C sets a flag that the loop reads between steps, so a checkpoint never holds
    half a step (BatchNorm statistics or RNG already moved, parameters half updated).
    A second Ctrl-C stops at once."""

    def __init__(self, quiet: bool = False):
        self.requested, self.quiet = False, quiet
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print("\nstopping after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def better(monitor: str, value: float, best, min_delta: float) -> bool:
    """Whether `value` improves on `best` by more than min_delta (None: nothing yet)."""
    if best is None:
        return True
    if bigger_is_better(monitor):
        return value > best + min_delta
    return value < best - min_delta


def make_backend(model, cfg: TrainConfig, data: Prepared, loss_kind: str):
    """The engine's training backend, given the resolved loss and optimizer settings."""
    # (name, lr, [(parameter names, lr multiplier, options)]): resolved once, here
    optim = (cfg.optimizer, cfg.lr, param_groups(cfg, model.trainable_names()))
    if resolve_engine(cfg.engine) == "numpy":
        if cfg.device not in ("auto", "cpu"):
            raise TrainingError(f"the NumPy engine runs on the CPU; --device {cfg.device} "
                                "needs the torch engine (--engine torch)")
        if cfg.precision == "bf16":
            raise TrainingError("the NumPy engine computes in float32; --precision bf16 "
                                "needs the torch engine (--engine torch)")
        from ..engines.numpy.backend import NumpyBackend
        return NumpyBackend(model, cfg, data, loss_kind, optim)
    from ..engines.torch.backend import TorchBackend
    return TorchBackend(model, cfg, data, loss_kind, optim)


class Trainer:
    """Runs epochs of backend steps; its state (epoch, step, partial tally, history,
    schedule and early-stopping state) is what a checkpoint holds besides the backend's."""

    def __init__(self, model, cfg: TrainConfig, data: Prepared, backend=None, callbacks=()):
        self.model, self.cfg, self.data = model, cfg, data
        try:
            self.loss_kind = resolve_loss(cfg.loss, model)
        except LossError as e:
            raise TrainingError(str(e)) from None
        n_cls = model.num_classes
        if len(data.class_names) > n_cls or (len(data.y_train) and data.y_train.max() >= n_cls):
            raise TrainingError(f"the data has {len(data.class_names)} classes but the model's "
                                f"output has {n_cls}; use Dense({len(data.class_names)}) last")
        self.world = distributed.current()
        if self.world.size > 1 and resolve_engine(cfg.engine) != "torch":
            raise TrainingError("several processes need the torch engine")
        self.backend = backend or make_backend(model, cfg, data, self.loss_kind)
        self.steps = max(1, math.ceil(len(data.x_train) / cfg.batch_size))
        self.history: list[dict] = []
        self.epoch = 0
        self.step_in_epoch = 0
        self.partial = Tally()
        self.plateau = {"factor": 1.0, "best": None, "wait": 0}
        self.stopper = {"best": None, "wait": 0, "best_epoch": None}
        self.best_weights = None
        self.stopped_early = False
        self.on_epoch_end = lambda trainer: None     # the run writes its files here
        self.on_interrupt = lambda trainer: None
        self.lr_scale, self.lr_override = 1.0, None  # set by callbacks (ReduceLROnPlateau, ...)
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not hasattr(cb, "set_trainer"):
                raise TrainingError(f"callbacks are cnnlab.callbacks objects, got {cb!r}")
            cb.set_trainer(self)
        self.lookahead = None   # its average is checkpointed with the run (tensors "ema.*")
        if cfg.lookahead:
            self.lookahead = Lookahead(**cfg.lookahead)
            self.lookahead.start(self.backend.export_weights())
        self.alternate_flip = (cfg.augment or {}).get("flip") == "alternate"
        self._pace_done, self._pace_t0 = 0, 0.0   # steps timed for the run's estimate

    @property
    def total_steps(self) -> int:
        return self.steps * self.cfg.epochs

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.epoch >= self.cfg.epochs

    # state ------------------------------------------------------------------
    def state_json(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "partial": self.partial.to_json(), "history": self.history,
                "plateau": self.plateau, "stopper": self.stopper,
                "stopped_early": self.stopped_early, "lr_scale": self.lr_scale}

    def load_state_json(self, st: dict):
        self.epoch, self.step_in_epoch = st["epoch"], st["step_in_epoch"]
        self.partial, self.history = Tally.from_json(st["partial"]), st["history"]
        self.plateau, self.stopper = st["plateau"], st["stopper"]
        self.stopped_early = st.get("stopped_early", False)
        self.lr_scale = st.get("lr_scale", 1.0)

    def logs(self, tally: Tally) -> dict:
        return tally.logs(self.model.num_classes > 5)

    # the loop -----------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train to cfg.epochs (or an early stop); leaves the weights in the model."""
        progress = EpochProgress(self.cfg.epochs, self.steps,
                                 self.cfg.verbose if self.world.is_main else 0)
        self.model.stop_training = False
        for cb in self.callbacks:
            cb.on_train_begin()
        with StopRequest(quiet=not self.world.is_main) as stop:
            try:
                self._epochs(progress, stop)
            except Stop:
                progress.close()
                self.partial += self.backend.collect()
                self.on_interrupt(self)
                raise
            except KeyboardInterrupt:
                progress.close()
                raise
        for cb in self.callbacks:
            cb.on_train_end(self.history[-1] if self.history else {})
        es = self.cfg.early_stopping or {}
        if self.best_weights is not None and es.get("restore_best_weights"):
            self.backend.set_weights(self.best_weights)
        self.model.set_weights(self.backend.export_weights())
        return self.history

    def _epochs(self, progress, stop):
        cfg, d, be = self.cfg, self.data, self.backend
        while not self.finished:
            epoch = self.epoch
            perm = np.random.default_rng(step_seed(cfg.seed, epoch)).permutation(len(d.x_train))
            if self.step_in_epoch == 0:
                self.partial = Tally()
                be.seed_epoch(step_seed(cfg.seed, epoch, -2))
                self.lr_override = None
                for cb in self.callbacks:
                    cb.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            progress.start_epoch(epoch, self.step_in_epoch)
            while self.step_in_epoch < self.steps:
                if self.world.any(stop.requested):   # only between two steps, all ranks
                    raise Stop
                s = self.step_in_epoch
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                be.set_lr(self.lr_override if self.lr_override is not None else self.lr_scale *
                          scheduled_lr(cfg, epoch * self.steps + s, self.total_steps, epoch,
                                       self.plateau["factor"]))
                extra = {"flip": alternating_flip(cfg.seed, epoch, idx, len(d.x_train))} \
                    if self.alternate_flip else {}
                be.train_step(idx, step_seed(cfg.seed, epoch, s), **extra)
                self.step_in_epoch = s + 1
                self._pace(progress, epoch * self.steps + s + 1)
                if self.lookahead is not None:
                    self.lookahead.after_step(be, epoch * self.steps + s + 1, self.total_steps)
                sync = progress.live or self.world.size > 1   # collect is a collective
                if sync and (s % 10 == 9 or s + 1 == self.steps):
                    self.partial += be.collect()
                    progress.update(s + 1, self.logs(self.partial))
            self.partial += be.collect()
            logs = self.logs(self.partial)
            if d.x_val is not None and self.world.is_main:
                logs.update({"val_" + k: v for k, v in be.evaluate(d.x_val, d.y_val).items()})
            logs["lr"] = be.lr
            logs["seconds"] = round(time.perf_counter() - t0, 3)
            logs = self.world.broadcast(logs)   # every rank decides on rank 0's figures
            progress.end_epoch({k: v for k, v in logs.items() if k != "seconds"})
            self.history.append({"epoch": epoch + 1, **logs})
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self._after_epoch(logs)
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, dict(logs))
            if getattr(self.model, "stop_training", False):
                self.stopped_early = True
            self.on_epoch_end(self)

    PACE_STEPS = (1, 4)   # the steps timed for the run's estimate (the first one warms up)

    def _pace(self, progress, t: int):
        """Once per process, after a few steps on the CPU: how long the rest of the training
        steps will take at the pace of those steps, said up front when it is more than a
        couple of minutes (evaluation comes on top)."""
        first, last = self.PACE_STEPS
        self._pace_done += 1
        done = self._pace_done
        if done == first:
            self._pace_t0 = time.perf_counter()
        if done != last or not self.world.is_main or not self.cfg.verbose:
            return
        if getattr(self.backend, "device", None) is not None and self.backend.device.type != "cpu":
            return   # device steps run asynchronously: the epoch lines say it better
        per_step = (time.perf_counter() - self._pace_t0) / (last - first)
        left = per_step * (self.total_steps - t)
        if left >= 120:
            progress.note(f"Training will take about {duration(left)} more at the pace of its "
                          f"first steps{self._speed_hint()}.")

    def _speed_hint(self) -> str:
        if self.backend.name != "torch":
            return ""
        if self.backend.precision.precision != "fp32":
            return ""
        if choose_precision("cpu", cpu_flags()).precision == "bf16":
            return " (fp32; this CPU runs bf16 natively: --precision bf16 is faster)"
        return (" (fp32: this CPU has no native bf16; one with AVX512-BF16 or AMX, or a GPU, "
                "trains several times faster)")

    def _after_epoch(self, logs):
        cfg = self.cfg
        if cfg.schedule == "plateau":
            mon = "val_loss" if "val_loss" in logs else "loss"
            p = self.plateau
            if better(mon, logs[mon], p["best"], 1e-4):
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
            if better(mon, logs[mon], st["best"], es["min_delta"]):
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

"""Keras' callbacks, with Keras' names, arguments and defaults.

    model.fit("mnist", epochs=30, callbacks=[
        EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True),
        ReduceLROnPlateau(factor=0.5, patience=2),
        ModelCheckpoint("runs/best.safetensors", save_best_only=True),
        CSVLogger("log.csv")])

A callback sees the Trainer (`self.trainer`) and the model (`self.model`; set
`self.model.stop_training = True` to stop after this epoch, as in Keras). Epochs are
0-based, as in Keras. `self.weights()` gives the weights the backend holds now.
Callbacks are not saved in checkpoints: a resumed run starts them afresh.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from ..fileformat import save
from .config import TrainingError, bigger_is_better


class Callback:
    def set_trainer(self, trainer):
        self.trainer = trainer
        self.model = trainer.model

    def weights(self) -> dict:
        return self.trainer.backend.export_weights()

    @property
    def writes(self) -> bool:
        """Whether this process writes files: the only one, or rank 0 of several."""
        world = getattr(self.trainer, "world", None)
        return world is None or world.is_main

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...


class _Monitor(Callback):
    """A monitored metric and whether larger is better (mode 'auto': accuracy-like → max)."""

    def __init__(self, monitor, mode, min_delta):
        if mode not in ("auto", "min", "max"):
            raise TrainingError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor, self.min_delta = monitor, abs(min_delta)
        self.bigger = mode == "max" or (mode == "auto" and bigger_is_better(monitor))
        self.best = -math.inf if self.bigger else math.inf

    def value(self, logs):
        if self.monitor not in (logs or {}):
            raise TrainingError(f"{type(self).__name__} monitors {self.monitor!r}, which this "
                                f"run does not report; it reports {', '.join(logs or {})}")
        return logs[self.monitor]

    def improved(self, value) -> bool:
        if self.bigger:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta


class EarlyStopping(_Monitor):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs;
    with restore_best_weights, end with the weights of the best epoch."""

    def __init__(self, monitor="val_loss", min_delta=0, patience=0, verbose=0, mode="auto",
                 baseline=None, restore_best_weights=False, start_from_epoch=0):
        super().__init__(monitor, mode, min_delta)
        self.patience, self.verbose, self.baseline = patience, verbose, baseline
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_weights, self.best_epoch = 0, 0, None, 0
        self.best = -math.inf if self.bigger else math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = self.value(logs)
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.weights()
        self.wait += 1
        if self.improved(value):
            self.best, self.best_epoch = value, epoch
            if self.restore_best_weights:
                self.best_weights = self.weights()
            if self.baseline is None or self.improved_over_baseline(value):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def improved_over_baseline(self, value):
        return value > self.baseline if self.bigger else value < self.baseline

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"Restoring the weights of epoch {self.best_epoch + 1}, the best one")
            self.trainer.backend.set_weights(self.best_weights)


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by `factor` (not below min_lr) when `monitor` has not
    improved for `patience` epochs; then wait `cooldown` epochs before watching again."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0):
        if not 0 < factor < 1:
            raise TrainingError(f"ReduceLROnPlateau factor must be in (0, 1), got {factor!r}")
        super().__init__(monitor, mode, min_delta)
        self.factor, self.patience, self.verbose = factor, patience, verbose
        self.cooldown, self.min_lr = cooldown, min_lr

    def on_train_begin(self, logs=None):
        self.wait = self.cooldown_counter = 0
        self.best = -math.inf if self.bigger else math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = self.value(logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.improved(value):
            self.best, self.wait = value, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = self.trainer.backend.lr
                new = max(old * self.factor, self.min_lr)
                if old > new:
                    self.trainer.lr_scale *= new / old
                    if self.verbose:
                        print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate "
                              f"to {new:g}.")
                    self.cooldown_counter, self.wait = self.cooldown, 0


class LearningRateScheduler(Callback):
    """At the start of each epoch, lr = schedule(epoch, lr) (the run's own schedule is then
    replaced for that epoch)."""

    def __init__(self, schedule, verbose=0):
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = float(self.schedule(epoch, self.trainer.backend.lr))
        if not (lr > 0 and math.isfinite(lr)):
            raise TrainingError(f"LearningRateScheduler: the schedule gave lr {lr!r} at epoch "
                                f"{epoch}")
        self.trainer.lr_override = lr
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr:g}.")


class ModelCheckpoint(_Monitor):
    """Save the model after each epoch to `filepath` (which may name {epoch} and any
    metric, e.g. "ckpt-{epoch:02d}-{val_loss:.3f}.safetensors"); with save_best_only,
    only when `monitor` improved. A cnnlab model file always holds the weights and the
    description, so save_weights_only changes nothing. In several processes, rank 0 saves."""

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 save_weights_only=False, mode="auto", save_freq="epoch",
                 initial_value_threshold=None):
        if save_freq != "epoch":
            raise TrainingError("ModelCheckpoint saves once per epoch (save_freq='epoch')")
        super().__init__(monitor, mode, 0.0)
        self.filepath, self.verbose, self.save_best_only = str(filepath), verbose, save_best_only
        if initial_value_threshold is not None:
            self.best = initial_value_threshold

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            if not self.improved(self.value(logs)):
                return
            self.best = logs[self.monitor]
        if not self.writes:
            return
        path = Path(self.filepath.format(epoch=epoch + 1, **logs))
        model = self.model.copy()
        model.set_weights(self.weights())
        path.parent.mkdir(parents=True, exist_ok=True)
        written = save(model, path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved the model to {written}")


class CSVLogger(Callback):
    """Write each epoch's logs as a CSV row (epoch 0-based, as Keras writes it)."""

    def __init__(self, filename, separator=",", append=False):
        self.filename, self.separator, self.append = Path(filename), separator, append
        self.keys = None

    def on_train_begin(self, logs=None):
        if self.writes and not self.append and self.filename.exists():
            self.filename.unlink()

    def on_epoch_end(self, epoch, logs=None):
        if not self.writes:
            return
        logs = dict(logs or {})
        new = not self.filename.exists() or self.filename.stat().st_size == 0
        if self.keys is None:
            self.keys = sorted(logs)
        with open(self.filename, "a", newline="") as f:
            w = csv.writer(f, delimiter=self.separator)
            if new:
                w.writerow(["epoch", *self.keys])
            w.writerow([epoch, *[logs.get(k, "") for k in self.keys]])


class LambdaCallback(Callback):
    """A callback from functions: on_epoch_begin(epoch, logs), on_epoch_end(epoch, logs),
    on_train_begin(logs), on_train_end(logs)."""

    def __init__(self, on_epoch_begin=None, on_epoch_end=None, on_train_begin=None,
                 on_train_end=None, **kwargs):
        unknown = sorted(set(kwargs) - {"on_batch_begin", "on_batch_end"})
        if unknown:
            raise TrainingError(f"LambdaCallback: unknown argument(s) {', '.join(unknown)}")
        if kwargs:
            raise TrainingError("LambdaCallback: cnnlab calls callbacks once per epoch; "
                                "on_batch_begin/on_batch_end are not offered")
        noop = lambda *a: None  # noqa: E731
        self.on_epoch_begin = on_epoch_begin or noop
        self.on_epoch_end = on_epoch_end or noop
        self.on_train_begin = on_train_begin or noop
        self.on_train_end = on_train_end or noop


__all__ = ["Callback", "CSVLogger", "EarlyStopping", "LambdaCallback", "LearningRateScheduler",
           "ModelCheckpoint", "ReduceLROnPlateau"]

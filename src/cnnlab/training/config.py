"""Training options: what a run needs to be repeated (saved as config.json), checked once.

Also the optimizer policy both engines read (`optimizer_options`) and the learning-rate
schedules (`scheduled_lr`). No engine, no PyTorch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..augment import check_augment
from ..engines.base import ENGINES, resolve_engine
from ..losses import LossError, canonical

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")
PRECISIONS = ("fp32", "bf16")
MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy")


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
    sync_bn: bool = False                 # several ranks: BatchNorm over the global batch

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"unknown training option(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(sorted(names))}")
        return cls(**d)

    def check(self) -> "TrainConfig":
        """Validate every option (raises TrainingError naming it); normalizes a few."""
        def need(cond, msg):
            if not cond:
                raise TrainingError(msg)

        def choice(value, allowed, what):
            need(value in allowed, f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")

        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be >= 1, got {self.batch_size}")
        choice(self.optimizer, OPTIMIZERS, "optimizer")
        choice(self.schedule, SCHEDULES, "schedule")
        choice(self.engine, ENGINES, "engine")
        self.engine = resolve_engine(self.engine)   # the run records the engine it used
        choice(self.precision, PRECISIONS, "precision")
        try:
            self.loss = canonical(self.loss)
        except LossError as e:
            raise TrainingError(str(e)) from None
        need(self.weight_decay is None or self.weight_decay >= 0, "weight_decay must be >= 0")
        need(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "nesterov needs the sgd optimizer and a momentum > 0 (e.g. --momentum 0.9)")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        need(0 <= self.val_split < 1, f"val_split must be in [0, 1), got {self.val_split}")
        need(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        if self.early_stopping is not None:
            es = {"monitor": "val_loss", "patience": 3, "min_delta": 0.0,
                  "restore_best_weights": True, **self.early_stopping}
            need(set(es) == {"monitor", "patience", "min_delta", "restore_best_weights"},
                 "early_stopping takes monitor, patience, min_delta, restore_best_weights")
            need(es["monitor"] in MONITORS,
                 f"early_stopping monitor must be one of {', '.join(MONITORS)}")
            self.early_stopping = es
        if self.augment:
            try:
                self.augment = check_augment(self.augment)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        return self


def optimizer_options(cfg: TrainConfig) -> dict:
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

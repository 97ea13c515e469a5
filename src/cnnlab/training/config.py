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
SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau", "warmup_linear")
REDUCTIONS = ("mean", "sum")
PRECISIONS = ("fp32", "bf16", "auto")
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
    lr_start: float = 0.2                 # warmup_linear: lr * lr_start -> lr -> lr * lr_end
    lr_end: float = 0.07
    loss: str = "categorical_crossentropy"
    label_smoothing: float = 0.0
    loss_reduction: str = "mean"          # sum: gradients of the batch's summed loss
    decoupled: bool = False               # sgd: lr, weight_decay per 1024 examples (sgd_scales)
    bias_lr: float = 1.0                  # lr multiplier of biases and BatchNorm gamma/beta
    bias_decay: bool = True               # False: no weight decay on biases, gamma, beta
    lookahead: dict | None = None         # {"every": 5, "decay": 0.95**5, "power": 3}
    dirac_init: bool = False              # convolutions start as identity (tricks.dirac_init)
    whiten: dict | None = None            # {"images": 5000, "eps": 5e-4}: first conv whitens
    augment: dict | str | None = None     # a dict, or the CLI's text: "flip,translate=0.1"
    standardize: bool = False
    val_split: float = 0.0                # 0: validate on the test split
    early_stopping: dict | int | None = None  # patience, or {"monitor", "patience", "min_delta", "restore_best_weights"}
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"                  # auto: torch when installed, else numpy
    precision: str = "auto"               # bf16 where native (cnnlab.hardware), else fp32
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
        need(isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1,
             f"momentum must be in [0, 1), got {self.momentum!r}")
        need(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "nesterov needs the sgd optimizer and a momentum > 0 (e.g. --momentum 0.9)")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        need(0 <= self.val_split < 1, f"val_split must be in [0, 1), got {self.val_split}")
        need(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        if isinstance(self.early_stopping, int) and not isinstance(self.early_stopping, bool):
            self.early_stopping = {"patience": self.early_stopping}   # as --early-stopping N
        choice(self.loss_reduction, REDUCTIONS, "loss_reduction")
        need(not self.decoupled or self.optimizer == "sgd",
             "decoupled hyperparameters are for the sgd optimizer")
        need(self.bias_lr > 0 and math.isfinite(self.bias_lr),
             f"bias_lr must be > 0, got {self.bias_lr}")
        need(0 <= self.lr_start and 0 <= self.lr_end, "lr_start and lr_end must be >= 0")
        if self.lookahead is not None:
            la = {"every": 5, "decay": 0.95 ** 5, "power": 3.0, **self.lookahead}
            need(set(la) == {"every", "decay", "power"},
                 "lookahead takes every, decay, power")
            need(isinstance(la["every"], int) and la["every"] >= 1 and 0 <= la["decay"] < 1
                 and la["power"] >= 0, "lookahead needs every >= 1, 0 <= decay < 1, power >= 0")
            self.lookahead = la
        if self.whiten is not None:
            wh = {"images": 5000, "eps": 5e-4, **self.whiten}
            need(set(wh) == {"images", "eps"}, "whiten takes images, eps")
            need(isinstance(wh["images"], int) and wh["images"] >= 1 and wh["eps"] >= 0,
                 "whiten needs images >= 1 and eps >= 0")
            self.whiten = wh
        if self.early_stopping is not None:
            need(isinstance(self.early_stopping, dict),
                 "early_stopping is a patience (int) or a dict of monitor, patience, min_delta, "
                 "restore_best_weights")
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


KILO = 1024


def sgd_scales(cfg: TrainConfig) -> tuple[float, float]:
    """(lr factor, weight-decay factor) that turn the config's lr and weight_decay into
    torch.optim.SGD's. Plain: (1, 1). Decoupled (airbench's convention): lr and weight_decay
    are given per 1024 examples and do not depend on the batch size B or the momentum m,

        k = 1024 (1 + 1 / (1 - m))              (1 / (1 - m): the momentum's gain)
        lr_sgd = lr / k,  times B with the mean loss (whose gradient is 1/B of the sum's)
        lr_sgd * wd_sgd = weight_decay * B / k  (the decay of one step, per example),

    so wd_sgd = weight_decay * B / (k lr_sgd)."""
    if not cfg.decoupled:
        return 1.0, 1.0
    k = KILO * (1 + 1 / (1 - cfg.momentum))
    lr_factor = (cfg.batch_size if cfg.loss_reduction == "mean" else 1) / k
    return lr_factor, cfg.batch_size / (k * cfg.lr * lr_factor)


def is_bias(name: str) -> bool:
    """Biases and BatchNorm gamma/beta: the parameters bias_lr and bias_decay apply to."""
    return name.rsplit(".", 1)[-1] in ("bias", "beta", "gamma")


def param_groups(cfg: TrainConfig, names) -> list[tuple[list[str], float, dict]]:
    """The parameters in optimizer groups: [(names, lr multiplier, options)], the others
    first, then the biases/BatchNorm ones when bias_lr or bias_decay sets them apart. A
    group's lr is the scheduled lr times its multiplier; the biases' weight decay keeps the
    others' decay per step (lr * weight_decay), or is 0 without bias_decay."""
    opts = optimizer_options(cfg)
    names = list(names)
    if cfg.bias_lr == 1 and cfg.bias_decay:
        return [(names, 1.0, opts)]
    biases = [n for n in names if is_bias(n)]
    others = [n for n in names if not is_bias(n)]
    bias_opts = dict(opts)
    if "weight_decay" in bias_opts:
        bias_opts["weight_decay"] = bias_opts["weight_decay"] / cfg.bias_lr \
            if cfg.bias_decay else 0.0
    return [(others, 1.0, opts), (biases, cfg.bias_lr, bias_opts)]


def bigger_is_better(monitor: str) -> bool:
    """Whether a larger value of a monitored metric is an improvement (Keras' 'auto' mode:
    accuracy-like metrics go up, losses go down)."""
    return "acc" in monitor or monitor.startswith("fmeasure")


def optimizer_options(cfg: TrainConfig) -> dict:
    """The optimizer settings of a config, as both engines read them (PyTorch semantics;
    AdamW's weight decay defaults to 0.01 when not given; decoupled sgd: sgd_scales)."""
    wd = cfg.weight_decay
    if cfg.optimizer == "sgd":
        if cfg.decoupled:
            wd = (wd or 0.0) * sgd_scales(cfg)[1]
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
    plateau:  lr * factor, the factor shrinking by gamma when the monitor stalls
    warmup_linear: linear from lr * lr_start to lr over `warmup` of the steps, then linear
              to lr * lr_end at the last step (airbench's)
    Decoupled sgd: all of it times sgd_scales' lr factor."""
    return _scheduled(cfg, step, total_steps, epoch, plateau_factor) * sgd_scales(cfg)[0]


def _scheduled(cfg, step, total_steps, epoch, plateau_factor):
    lr = cfg.lr
    if cfg.schedule == "warmup_linear":
        warm = int(cfg.warmup * total_steps)
        if step < warm:
            return lr * (cfg.lr_start + (1 - cfg.lr_start) * step / warm)
        t = (step - warm) / max(total_steps - warm, 1)
        return lr * (1 + (cfg.lr_end - 1) * t)
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

"""Optimizers for the NumPy engine, with exactly torch.optim's update rules and defaults.

    opt = make_optimizer("adam", params, lr=1e-3, betas=(0.9, 0.999))
    opt.step(grads)          # updates the arrays in params in place
    opt.lr = new_lr          # a schedule sets it before each step
    arrays, meta = opt.state_dict(); opt.load_state_dict(arrays, meta)

params and grads are dicts name -> array (e.g. "conv2d.kernel"). One step from the same
state gives the same weights as the torch.optim class of the same name. The updates run
in the parameters' dtype. Below, g is the gradient, p the parameter, t the step count.
"""
from __future__ import annotations

import math

import numpy as np


def _plain(default, value):
    """An option as a Python bool, float or tuple of floats (so float32 math stays float32:
    NumPy scalars would promote it; Python floats do not)."""
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, tuple):
        return tuple(float(v) for v in value)
    return float(value)


class Optimizer:
    """Common machinery: per-parameter state arrays, step counts, checkpoints."""
    name = "optimizer"
    defaults: dict = {}

    def __init__(self, params: dict, lr=None, **hyper):
        unknown = sorted(set(hyper) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                             f"allowed: lr, {', '.join(self.defaults)}")
        self.params = params
        self.lr = self.default_lr if lr is None else lr
        self.hyper = {k: _plain(v, hyper.get(k, v)) for k, v in self.defaults.items()}
        self.state: dict[str, dict[str, np.ndarray]] = {k: {} for k in params}
        self.steps = {k: 0 for k in params}
        self._check()

    @property
    def lr(self) -> float:
        """The learning rate; a schedule may set it before any step."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = float(value)  # a Python float: a NumPy float64 would promote float32 math

    def _check(self):
        for key, value in self.hyper.items():
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
                   for v in values):
                raise ValueError(f"{self.name}: {key} must be >= 0, got {value!r}")
        if self.lr < 0:
            raise ValueError(f"{self.name}: lr must be >= 0, got {self.lr}")

    def step(self, grads: dict):
        """One update of every parameter that has a gradient in grads."""
        for key, g in grads.items():
            p = self.params[key]
            self.steps[key] += 1
            self._update(p, np.asarray(g, dtype=p.dtype), self.state[key], self.steps[key])

    def _update(self, p, g, state, t):
        raise NotImplementedError

    def _zeros(self, state, key, p):
        if key not in state:
            state[key] = np.zeros_like(p)
        return state[key]

    def state_dict(self):
        """(arrays, meta): arrays {"<param>.<state>": array}, meta JSON-ready
        {"optimizer", "lr", "hyper", "steps"}."""
        arrays = {f"{k}.{s}": a for k, st in self.state.items() for s, a in st.items()}
        meta = {"optimizer": self.name, "lr": self.lr,
                "hyper": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in self.hyper.items()},
                "steps": dict(self.steps)}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict):
        """Restore what state_dict returned (lr and options too, as torch.optim does)."""
        if meta.get("optimizer") != self.name:
            raise ValueError(f"optimizer state is for {meta.get('optimizer')!r}, "
                             f"not {self.name!r}")
        self.lr = meta["lr"]
        self.hyper = {k: _plain(v, meta["hyper"].get(k, v)) for k, v in self.defaults.items()}
        self.steps = {k: int(meta["steps"].get(k, 0)) for k in self.params}
        self.state = {k: {} for k in self.params}
        for name, arr in arrays.items():
            key, sname = name.rsplit(".", 1)
            if key not in self.params:
                raise ValueError(f"optimizer state for unknown parameter {key!r}")
            self.state[key][sname] = np.array(arr, dtype=self.params[key].dtype)

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}(lr={self.lr}, {opts})"


class SGD(Optimizer):
    """torch.optim.SGD:
        g <- g + weight_decay * p
        b <- g at the first step, then b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b (nesterov) or g <- b
        p <- p - lr * g
    """
    name = "sgd"
    default_lr = 1e-3
    defaults = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}

    def _check(self):
        super()._check()
        h = self.hyper
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ValueError("sgd: nesterov needs momentum > 0 and dampening = 0")

    def _update(self, p, g, state, t):
        h = self.hyper
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        if h["momentum"]:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= h["momentum"]
                buf += (1 - h["dampening"]) * g
            g = g + h["momentum"] * buf if h["nesterov"] else buf
        p -= self.lr * g


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient):
        g <- g + weight_decay * p
        m <- m + (1 - b1) (g - m)            v <- b2 v + (1 - b2) g^2
        v_max <- max(v_max, v) with amsgrad, used instead of v below
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    name = "adam"
    default_lr = 1e-3
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
    decoupled = False

    def _update(self, p, g, state, t):
        h = self.hyper
        b1, b2 = h["betas"]
        if self.decoupled:
            p *= 1 - self.lr * h["weight_decay"]
        elif h["weight_decay"]:
            g = g + h["weight_decay"] * p
        m, v = self._zeros(state, "exp_avg", p), self._zeros(state, "exp_avg_sq", p)
        m += (1 - b1) * (g - m)
        v *= b2
        v += (1 - b2) * g * g
        if h["amsgrad"]:
            v = np.maximum(self._zeros(state, "max_exp_avg_sq", p), v,
                           out=state["max_exp_avg_sq"])
        step_size = self.lr / (1 - b1 ** t)
        denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + h["eps"]
        p -= step_size * m / denom


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay, p <- p (1 - lr * weight_decay), then the
    Adam update without the L2 term."""
    name = "adamw"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False}
    decoupled = True


class RMSprop(Optimizer):
    """torch.optim.RMSprop:
        g <- g + weight_decay * p
        s <- alpha s + (1 - alpha) g^2
        centered: a <- a + (1 - alpha) (g - a), d = sqrt(s - a^2) + eps;  else d = sqrt(s) + eps
        momentum > 0: b <- momentum b + g / d, p <- p - lr b;  else p <- p - lr g / d
    """
    name = "rmsprop"
    default_lr = 1e-2
    defaults = {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False}

    def _update(self, p, g, state, t):
        h = self.hyper
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        s = self._zeros(state, "square_avg", p)
        s *= h["alpha"]
        s += (1 - h["alpha"]) * g * g
        if h["centered"]:
            a = self._zeros(state, "grad_avg", p)
            a += (1 - h["alpha"]) * (g - a)
            d = np.sqrt(s - a * a) + h["eps"]
        else:
            d = np.sqrt(s) + h["eps"]
        if h["momentum"] > 0:
            b = self._zeros(state, "momentum_buffer", p)
            b *= h["momentum"]
            b += g / d
            p -= self.lr * b
        else:
            p -= self.lr * g / d


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam, AdamW, RMSprop)}


def make_optimizer(name: str, params: dict, lr=None, **hyper) -> Optimizer:
    """An optimizer by name (sgd, adam, adamw, rmsprop; any case) over params, a dict of
    arrays updated in place. lr=None takes torch's default (1e-3; RMSprop 1e-2)."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return cls(params, lr, **hyper)

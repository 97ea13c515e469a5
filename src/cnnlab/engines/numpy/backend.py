"""One training step with the NumPy engine, for the loop in `cnnlab.training`.

The optimizer updates model.weights in place; the engine reads them at every call.
Dropout masks come from the engine's NumPy generator, reseeded every epoch, so a
resumed run is exact here too.
"""
from __future__ import annotations

import numpy as np

from ...augment import augment
from ...hardware import PrecisionChoice
from ...preprocess import apply
from ..base import Tally, evaluate_logits
from .engine import NumpyEngine
from .optim import make_optimizer


class NumpyBackend:
    name = "numpy"
    device_info = "NumPy, float32"
    precision = PrecisionChoice("fp32", "the NumPy engine computes in float32")

    def __init__(self, model, cfg, data, loss_kind: str, optim):
        self.model, self.cfg, self.loss_kind = model, cfg, loss_kind
        self.engine = NumpyEngine(model)
        trainable = set(model.trainable_names())
        self.params = {k: v for k, v in model.weights.items() if k in trainable}
        name, lr, opts = optim
        self.opt = make_optimizer(name, self.params, lr, **opts)
        self.x, self.y, self.prep = data.x_train, data.y_train, data.preprocessing
        self.tally = Tally()

    @property
    def lr(self):
        return self.opt.lr

    def set_lr(self, lr):
        self.opt.lr = lr

    def seed_epoch(self, seed):
        self.engine.rng = np.random.default_rng(seed)

    def train_step(self, idx, seed):
        xb, yb = apply(self.prep, self.x[idx]), self.y[idx]
        if self.cfg.augment:
            xb = augment(xb, self.cfg.augment, np.random.default_rng(seed))
        loss, logits, grads = self.engine.loss_and_grads(xb, yb, self.loss_kind,
                                                         self.cfg.label_smoothing)
        self.opt.step(grads)
        self.tally.add_batch(self.model, loss, logits, yb)

    def collect(self) -> Tally:
        """The metrics of the steps since the last collect."""
        out, self.tally = self.tally, Tally()
        return out

    def evaluate(self, x_uint8, y, batch_size=512):
        logits = lambda xb: self.engine.forward(apply(self.prep, xb))  # noqa: E731
        return evaluate_logits(self.model, logits, x_uint8, y, self.loss_kind, batch_size)

    # weights and state ----------------------------------------------------------
    def export_weights(self):
        return {k: v.copy() for k, v in self.model.weights.items()}

    def set_weights(self, weights):
        for k, v in weights.items():   # in place: the optimizer holds these arrays
            self.model.weights[k][...] = v

    def state(self):
        arrays, opt_meta = self.opt.state_dict()
        tensors = {f"w.{k}": v.copy() for k, v in self.model.weights.items()}
        tensors.update({f"opt.{k}": v for k, v in arrays.items()})
        rng = self.engine.rng.bit_generator.state
        return tensors, {"optimizer": opt_meta, "engine": "numpy", "rng": _rng_json(rng)}

    def load_state(self, tensors, meta):
        if meta.get("engine") != "numpy":
            raise ValueError("this checkpoint was written by the torch engine; it resumes "
                             "with the engine that wrote it")
        self.set_weights({k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
        self.opt.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
                                 meta["optimizer"])
        self.engine.rng = np.random.default_rng()
        self.engine.rng.bit_generator.state = _rng_from_json(meta["rng"])


def _rng_json(state: dict) -> dict:
    """PCG64 state as JSON (its 128-bit integers as strings)."""
    return {"bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def _rng_from_json(d: dict) -> dict:
    return {"bit_generator": d["bit_generator"],
            "state": {k: int(v) for k, v in d["state"].items()},
            "has_uint32": d["has_uint32"], "uinteger": d["uinteger"]}

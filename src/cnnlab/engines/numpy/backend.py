"""One training step with the NumPy engine, for the loop in `cnnlab.training`.

The optimizer updates model.weights in place; the engine reads them at every call.
Dropout masks come from the engine's NumPy generator, reseeded every epoch, so a
resumed run is exact here too.
"""
from __future__ import annotations

import numpy as np

from ...augment import augment, flip_images
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
        """optim: (optimizer name, lr, [(parameter names, lr multiplier, options)]), as the
        Trainer resolves them (cnnlab.training.config.param_groups)."""
        self.model, self.cfg, self.loss_kind = model, cfg, loss_kind
        self.engine = NumpyEngine(model)
        trainable = set(model.trainable_names())
        self.params = {k: v for k, v in model.weights.items() if k in trainable}
        name, lr, groups = optim
        # one optimizer per parameter group (biases apart with bias_lr / bias_decay)
        self.groups = [(make_optimizer(name, {k: self.params[k] for k in names}, lr * scale,
                                       **group_opts), scale)
                       for names, scale, group_opts in groups]
        self.opt = self.groups[0][0]
        self.x, self.y, self.prep = data.x_train, data.y_train, data.preprocessing
        self.tally = Tally()

    @property
    def lr(self):
        return self.opt.lr / self.groups[0][1]

    def set_lr(self, lr):
        for opt, scale in self.groups:
            opt.lr = lr * scale

    def seed_epoch(self, seed):
        self.engine.rng = np.random.default_rng(seed)

    def train_step(self, idx, seed, flip=None):
        """flip: which images to mirror first (the loop's alternating flip), or None."""
        xb, yb = apply(self.prep, self.x[idx]), self.y[idx]
        if flip is not None:
            xb = flip_images(xb, flip)
        if self.cfg.augment:
            xb = augment(xb, self.cfg.augment, np.random.default_rng(seed))
        loss, logits, grads = self.engine.loss_and_grads(xb, yb, self.loss_kind,
                                                         self.cfg.label_smoothing,
                                                         self.cfg.loss_reduction)
        for opt, _ in self.groups:
            opt.step({k: grads[k] for k in opt.params})
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
        tensors = {f"w.{k}": v.copy() for k, v in self.model.weights.items()}
        meta = {"engine": "numpy", "rng": _rng_json(self.engine.rng.bit_generator.state)}
        for i, (opt, _) in enumerate(self.groups):   # group 0 as "opt." / "optimizer"
            arrays, meta[f"optimizer{i or ''}"] = opt.state_dict()
            tensors.update({f"opt{i or ''}.{k}": v for k, v in arrays.items()})
        return tensors, meta

    def load_state(self, tensors, meta):
        if meta.get("engine") != "numpy":
            raise ValueError("this checkpoint was written by the torch engine; it resumes "
                             "with the engine that wrote it")
        self.set_weights({k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
        for i, (opt, _) in enumerate(self.groups):
            prefix = f"opt{i or ''}."
            opt.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                 if k.startswith(prefix)}, meta[f"optimizer{i or ''}"])
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

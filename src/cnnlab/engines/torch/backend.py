"""One training step with PyTorch, for the loop in `cnnlab.training`.

The whole training set stays in memory as a uint8 tensor on the device; a step
gathers a batch by index, scales and standardizes it, augments it as a batch,
and runs forward, loss, backward and the optimizer. Metrics accumulate on the
device and are read back only when the loop asks (`collect`), so the CPU never
waits for the device mid-epoch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...augment import augment, flip_images
from ...hardware import PrecisionChoice, auto_precision
from ...training.config import param_groups
from ..base import Tally, binary_output, evaluate_logits
from .engine import TorchNet, export_weights, load_weights, param_names, resolve_device


def make_torch_optimizer(optim, params):
    """optim: (name, lr, options) as the Trainer resolves them."""
    name, lr, opts = optim
    make = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop}[name]
    return make(params, lr=lr, **opts)


def precision_of(asked: str, device) -> PrecisionChoice:
    """The precision a run computes in: `auto` decides by the hardware (cnnlab.hardware)."""
    if asked == "auto":
        return auto_precision(device)
    return PrecisionChoice(asked, "asked for")


def loss_fn(kind, logits, y, label_smoothing=0.0):
    """Mean loss over the batch from logits; `kind` comes from cnnlab.losses.resolve_loss
    (the NumPy engine's formulas in engines/numpy/ops.py say the same)."""
    if kind == "softmax_ce":
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if kind == "sigmoid_bce":  # Keras-style smoothing: t = y (1 - ls) + ls / 2
        t = y.to(logits.dtype) * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits[:, 0], t)
    if logits.shape[1] == 1:  # mse on a sigmoid unit: against the 0/1 label
        return F.mse_loss(torch.sigmoid(logits[:, 0]), y.to(logits.dtype))
    probs = torch.softmax(logits, dim=1)  # mse: probabilities against one-hot targets
    return F.mse_loss(probs, F.one_hot(y, probs.shape[1]).to(probs.dtype))


def count_batch(model, logits, y):
    """(correct, top-5 correct) on the device, by the rule of engines.base: the predicted
    class is the first argmax (z > 0 for one sigmoid unit); top-k counts a true class whose
    rank #{z_k > z_y} + #{k < y: z_k = z_y} is below k."""
    if binary_output(model):
        return ((logits[:, 0] > 0).long() == y).sum(), None
    correct = (logits.argmax(1) == y).sum()
    if model.num_classes <= 5:
        return correct, None
    t = logits.gather(1, y[:, None])
    before = torch.arange(logits.shape[1], device=logits.device)[None, :] < y[:, None]
    rank = (logits > t).sum(1) + ((logits == t) & before).sum(1)
    return correct, (rank < 5).sum()


class TorchBackend:
    name = "torch"

    def __init__(self, model, cfg, data, loss_kind: str, optim):
        self.model, self.cfg, self.loss_kind = model, cfg, loss_kind
        self.device = resolve_device(cfg.device)
        self.net = TorchNet(model).to(self.device)
        load_weights(self.net, model)
        self.channels_last = cfg.channels_last and model.input_shape[-1] > 1
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        named = dict(param_names(self.net))
        self.params = list(named.values())
        groups = [{"params": [named[n] for n in names], "lr_scale": scale, **opts}
                  for names, scale, opts in param_groups(cfg, named) if names]
        self.opt = make_torch_optimizer(optim, groups)  # biases apart: bias_lr, bias_decay
        self.x = self._images(data.x_train)
        self.y = torch.from_numpy(data.y_train).to(self.device)
        prep = data.preprocessing
        c = model.input_shape[-1]
        self.mean = torch.tensor(prep["mean"], dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.inv_std = (1 / torch.tensor(prep["std"], dtype=torch.float32,
                                         device=self.device)).view(1, c, 1, 1)
        self.precision = precision_of(cfg.precision, self.device)
        self.autocast = self.precision.precision == "bf16"
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.seen = 0
        kind = "CUDA " + torch.cuda.get_device_name(self.device) if self.device.type == "cuda" \
            else f"CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
        self.device_info = f"{kind}, {self.precision}" + \
            (", channels_last" if self.channels_last else "")

    def _images(self, x_uint8: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2)
        return t.to(self.device)  # stays uint8: 4x less memory than float

    def _batch(self, x_uint8: torch.Tensor) -> torch.Tensor:
        xb = (x_uint8.float() * (1 / 255) - self.mean) * self.inv_std
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb

    # loop interface -------------------------------------------------------------
    @property
    def lr(self):
        g = self.opt.param_groups[0]
        return g["lr"] / g.get("lr_scale", 1.0)

    def set_lr(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def seed_epoch(self, seed):
        torch.manual_seed(seed)  # dropout masks

    def train_step(self, idx: np.ndarray, seed: int, flip=None):
        """flip: which images to mirror first (the loop's alternating flip), or None."""
        self.net.train()
        ii = torch.from_numpy(idx).to(self.device)
        xb, yb = self._batch(self.x.index_select(0, ii)), self.y.index_select(0, ii)
        if flip is not None:
            xb = flip_images(xb, flip)
        if self.cfg.augment:
            xb = augment(xb, self.cfg.augment, np.random.default_rng(seed))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.net(xb)
            loss = loss_fn(self.loss_kind, logits.float(), yb, self.cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        (loss * len(idx) if self.cfg.loss_reduction == "sum" else loss).backward()
        self.opt.step()
        with torch.no_grad():
            self._count(self.sums, loss, logits, yb)
            self.seen += len(idx)

    def _count(self, sums, loss, logits, y):
        """Add the batch's loss sum, correct and top-5 correct counts (on the device)."""
        sums[0] += loss.detach().double() * len(y)
        correct, top5 = count_batch(self.model, logits, y)
        sums[1] += correct
        if top5 is not None:
            sums[2] += top5

    def collect(self) -> Tally:
        """The metrics of the steps since the last collect (one device sync)."""
        s = self.sums.tolist()
        out = Tally(s[0], int(s[1]), int(s[2]), self.seen)
        self.sums.zero_()
        self.seen = 0
        return out

    @torch.no_grad()
    def logits(self, x_uint8: np.ndarray) -> np.ndarray:
        """Inference logits (float32 NumPy) for uint8 images, in the run's precision."""
        self.net.eval()
        xb = self._batch(self._images(x_uint8))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.net(xb).float().cpu().numpy()

    def evaluate(self, x_uint8, y, batch_size=1024):
        return evaluate_logits(self.model, self.logits, x_uint8, y, self.loss_kind, batch_size)

    # weights and state ------------------------------------------------------------
    def export_weights(self):
        return export_weights(self.net)

    def set_weights(self, weights):
        self.model.set_weights(weights)
        load_weights(self.net, self.model)

    def state(self):
        """(tensors, json) holding weights, optimizer state and RNG, for a checkpoint."""
        tensors = {f"w.{k}": v for k, v in self.export_weights().items()}
        sd = self.opt.state_dict()
        opt_json = {"param_groups": sd["param_groups"], "scalars": {}}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"opt.{pid}.{key}"] = val.detach().cpu().numpy()
                else:
                    opt_json["scalars"][f"{pid}.{key}"] = val
        tensors["rng.torch"] = torch.get_rng_state().numpy()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        return tensors, {"optimizer": opt_json, "engine": "torch"}

    def load_state(self, tensors, meta):
        self.set_weights({k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
        opt_json = meta["optimizer"]
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, key = k.split(".", 2)
                state.setdefault(int(pid), {})[key] = torch.from_numpy(np.array(v))
        for k, v in opt_json["scalars"].items():
            pid, key = k.split(".", 1)
            state.setdefault(int(pid), {})[key] = v
        self.opt.load_state_dict({"state": state, "param_groups": opt_json["param_groups"]})
        torch.set_rng_state(torch.from_numpy(np.array(tensors["rng.torch"])))
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(np.array(tensors["rng.cuda"])), self.device)

"""One training step with PyTorch, for the loop in `cnnlab.training`.

The whole training set stays in memory as a uint8 tensor on the device; a step
gathers a batch by index, scales and standardizes it, augments it as a batch,
and runs forward, loss, backward and the optimizer. Metrics accumulate on the
device and are read back only when the loop asks (`collect`), so the CPU never
waits for the device mid-epoch.

In a process group (see `cnnlab.training.distributed`) the network is wrapped in
DistributedDataParallel and each rank trains on its contiguous piece of every step's
global batch, its loss scaled so that the averaged gradient is one process's
(`_shard`); `collect` all-reduces the metric sums.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...augment import augment, flip_images
from ...hardware import PrecisionChoice, auto_precision
from ..base import Tally, binary_output, evaluate_logits
from .engine import (BatchNorm, TorchNet, _training, export_weights, load_weights, param_names,
                     resolve_device)


def make_torch_optimizer(name, lr, groups):
    """A torch optimizer over parameter groups (dicts with their own options)."""
    make = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop}[name]
    return make(groups, lr=lr)


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
        self.train_net = self._distribute(cfg)
        name, lr, groups = optim   # biases apart with bias_lr / bias_decay
        groups = [{"params": [named[n] for n in names], "lr_scale": scale, **opts}
                  for names, scale, opts in groups if names]
        self.opt = make_torch_optimizer(name, lr, groups)
        self.x = self._images(data.x_train)
        self.y = torch.from_numpy(data.y_train).to(self.device)
        prep = data.preprocessing
        c = model.input_shape[-1]
        self.scale = float(prep.get("scale", 1 / 255))
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
        if self.world_size > 1:
            self.device_info += (f"; {self.world_size} ranks ({dist.get_backend()}), "
                                 f"{'SyncBatchNorm' if cfg.sync_bn else 'BatchNorm per rank'}")

    def _images(self, x_uint8: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2)
        return t.to(self.device)  # stays uint8: 4x less memory than float

    def _batch(self, x_uint8: torch.Tensor) -> torch.Tensor:
        xb = (x_uint8.float() * self.scale - self.mean) * self.inv_std   # preprocess.apply
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
        torch.manual_seed(rank_seed(seed, self.rank))  # dropout masks

    def train_step(self, idx: np.ndarray, seed: int, flip=None):
        """flip: which images to mirror first (the loop's alternating flip), or None."""
        self.net.train()
        global_batch = len(idx)
        idx, weight = self._shard(idx)
        seed = rank_seed(seed, self.rank)
        ii = torch.from_numpy(idx).to(self.device)
        xb, yb = self._batch(self.x.index_select(0, ii)), self.y.index_select(0, ii)
        if flip is not None:
            xb = flip_images(xb, flip)
        if self.cfg.augment:
            xb = augment(xb, self.cfg.augment, np.random.default_rng(seed))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.train_net(xb)
            loss = loss_fn(self.loss_kind, logits.float(), yb, self.cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        # summed loss: the global batch's sum; across ranks, `weight` makes DDP's mean of the
        # ranks' gradients equal one process's gradient of the whole batch
        scale = weight * (global_batch if self.cfg.loss_reduction == "sum" else 1)
        (loss if scale == 1 else loss * scale).backward()
        self.opt.step()
        if weight == 0:  # a rank without images this step counts nothing
            return
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
        s = self.sums.tolist() + [self.seen]
        if self.world_size > 1:  # float64 sums: exact for the counts, the loss to rounding
            t = torch.tensor(s, dtype=torch.float64, device=self.sums.device)
            dist.all_reduce(t)
            s = t.tolist()
        out = Tally(s[0], int(s[1]), int(s[2]), int(s[3]))
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
        tensors.update(self._rng_states())
        meta = {"optimizer": opt_json, "engine": "torch"}
        if self.world_size > 1:
            meta["ranks"] = self.world_size
        return tensors, meta

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
        self._load_rng(tensors, meta.get("ranks", 1))

    # data parallelism ------------------------------------------------------------------
    def _distribute(self, cfg):
        """The module a training step calls: the network itself, or in a process group
        the network wrapped in DDP (its BatchNorm layers synchronized with cfg.sync_bn)."""
        grouped = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if grouped \
            else (0, 1)
        if self.world_size == 1:
            return self.net
        self.sync_bn = [m for m in self.net.modules() if isinstance(m, BatchNorm)] \
            if cfg.sync_bn else []
        for m in self.sync_bn:
            m.__class__ = SyncBatchNorm
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(
            self.net,
            device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None)

    def _shard(self, idx: np.ndarray):
        """(this rank's piece of the global batch idx, its loss weight n_r * N / B).

        Pieces as np.array_split cuts them. A rank left without an image (a last batch
        smaller than the number of ranks) runs the batch's first image with weight 0:
        no gradient, no metrics, no SyncBatchNorm statistics."""
        if self.world_size == 1:
            return idx, 1
        n, size = len(idx), self.world_size
        lo = self.rank * (n // size) + min(self.rank, n % size)
        mine = idx[lo:lo + n // size + (self.rank < n % size)]
        for m in self.sync_bn:
            m.global_images, m.empty = n, len(mine) == 0
        if len(mine) == 0:
            return idx[:1], 0
        return mine, len(mine) * size / n

    def _rng_states(self) -> dict:
        """The torch RNG state of every rank: rank 0's as `rng.torch` (as one process
        saves it), rank r's as `rng.torch.r<r>`; a collective in a process group."""
        own = {"rng.torch": torch.get_rng_state().numpy()}
        if self.device.type == "cuda":
            own["rng.cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        if self.world_size == 1:
            return own
        every = [None] * self.world_size
        dist.all_gather_object(every, own)
        out = dict(every[0])
        for r, st in enumerate(every[1:], 1):
            out.update({f"{k}.r{r}": v for k, v in st.items()})
        return out

    def _load_rng(self, tensors, ranks: int):
        """This rank's RNG state when the checkpoint has the same number of ranks; with
        another number, rank r > 0 starts from a seed of its own (correct, not identical)."""
        suffix = f".r{self.rank}" if self.rank else ""
        if ranks != self.world_size or f"rng.torch{suffix}" not in tensors:
            suffix = ""
            if self.rank:
                torch.manual_seed(rank_seed(self.cfg.seed, self.rank))
                return
        torch.set_rng_state(torch.from_numpy(np.array(tensors[f"rng.torch{suffix}"])))
        if f"rng.cuda{suffix}" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(np.array(tensors[f"rng.cuda{suffix}"])),
                                     self.device)


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank r uses for what is drawn per rank (augmentation, dropout): the seed
    itself on rank 0 (so one process is unchanged), a distinct 63-bit seed on the others."""
    if rank == 0:
        return seed
    state = np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class SyncBatchNorm(BatchNorm):
    """BatchNorm with the statistics of the global batch in training, over all ranks:
        mu  = allreduce(sum x) / M,  var = allreduce(sum (x - mu)^2) / M,
    M = B * H * W for the global batch of B images (the backend sets B per step). The
    all-reduces are differentiable, so the gradients are one process's; the moving
    statistics follow BatchNorm's rule with M. Inference is BatchNorm's."""
    global_images = 0
    empty = False

    def transform(self, x):
        if not _training(self):
            return super().transform(x)
        from torch.distributed.nn.functional import all_reduce
        lay = self.layer
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        keep = 0.0 if self.empty else 1.0
        m = self.global_images * (x[0].numel() // x.shape[1])
        mu = all_reduce(x.sum(dims) * keep) / m
        xc = x - mu.view(shape)
        var = all_reduce((xc * xc).sum(dims) * keep) / m
        with torch.no_grad():
            k = lay.momentum
            self.moving_mean.copy_(k * self.moving_mean + (1 - k) * mu)
            self.moving_variance.copy_(k * self.moving_variance
                                       + (1 - k) * var * m / max(m - 1, 1))
        return xc * torch.rsqrt(var.view(shape) + lay.epsilon) * self.gamma.view(shape) + \
            self.beta.view(shape)

"""Training tricks of the fast CIFAR-10 recipes, usable by any model (options of TrainConfig).

    dirac_init      convolutions start as the identity on their first input channels
    whiten_init     the first convolution whitens its input patches (then frozen by the model)
    Lookahead       weights pulled towards a running average every few steps (airbench's EMA)

Each works on a Model's weights (Keras layouts, NumPy), so both engines share it. No engine
and no PyTorch here.
"""
from __future__ import annotations

import numpy as np

from .. import layers as L
from ..preprocess import apply
from .config import TrainConfig, TrainingError


def dirac_init(model) -> list[str]:
    """Every trainable Conv2D kernel K (kh, kw, in, out) gets, for c < min(in, out),
        K[:, :, :, c] = 0 except K[kh // 2, kw // 2, c, c] = 1,
    so its first filters pass their input channel through (torch.nn.init.dirac_ on the
    first `in` filters); the other filters keep their initialization. Returns the kernels set."""
    done = []
    for layer in model.layers:
        if isinstance(layer, L.Conv2D) and layer.trainable:
            k = model.weights[f"{layer.name}.kernel"]
            kh, kw, cin, cout = k.shape
            m = min(cin, cout)
            k[..., :m] = 0
            k[kh // 2, kw // 2, np.arange(m), np.arange(m)] = 1
            done.append(f"{layer.name}.kernel")
    return done


def patches(x: np.ndarray, kernel) -> np.ndarray:
    """All kh x kw patches of NHWC images (stride 1, no padding) as rows (P, kh*kw*C), each
    flattened in the Keras kernel order (u, v, c)."""
    kh, kw = kernel
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N,Ho,Wo,C,kh,kw
    return win.transpose(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[3])


def whitening_filters(p: np.ndarray, eps: float = 5e-4) -> np.ndarray:
    """Filters (D, D) whose responses to the patches p (P, D) are white: with the patches'
    second-moment matrix S = p^T p / P = V diag(lam) V^T (eigh),

        W = V diag(1 / sqrt(lam + eps)),  so (p W)^T (p W) / P = diag(lam / (lam + eps)) ~ I.

    Columns ordered by decreasing eigenvalue."""
    p = np.asarray(p, np.float64)
    s = p.T @ p / len(p)
    lam, v = np.linalg.eigh(s)
    lam, v = lam[::-1], v[:, ::-1]
    return v / np.sqrt(np.maximum(lam, 0) + eps)


def whiten_init(model, x_uint8: np.ndarray, preprocessing: dict, images: int = 5000,
                eps: float = 5e-4) -> str:
    """Set the first layer, a Conv2D with D = kh*kw*C or 2D filters, to whitening filters
    of the first `images` training images (preprocessed as in training): the D filters of
    whitening_filters, followed by their negatives when there are 2D (so a ReLU/GELU after
    it keeps both signs). Its bias, if any, is set to 0. Returns the layer's name."""
    layer = model.layers[0]
    if not isinstance(layer, L.Conv2D) or layer.strides != (1, 1) or layer.padding != "valid":
        raise TrainingError("whiten: the model's first layer must be a Conv2D with stride 1 "
                            "and 'valid' padding")
    kh, kw = layer.kernel_size
    d = kh * kw * model.input_shape[2]
    if layer.filters not in (d, 2 * d):
        raise TrainingError(f"whiten: the first Conv2D needs {d} or {2 * d} filters "
                            f"(kh*kw*channels, or twice that), it has {layer.filters}")
    x = apply(preprocessing, x_uint8[:images]).astype(np.float64)
    w = whitening_filters(patches(x, (kh, kw)), eps)
    if layer.filters == 2 * d:
        w = np.concatenate([w, -w], axis=1)
    model.weights[f"{layer.name}.kernel"][...] = w.reshape(kh, kw, -1, layer.filters)
    if layer.use_bias:
        model.weights[f"{layer.name}.bias"][...] = 0
    return layer.name


def init_model(model, cfg: TrainConfig, x_uint8, preprocessing) -> list[str]:
    """The initialization options of a fresh model: dirac_init, then whiten. Returns what
    was done, for the console."""
    done = []
    if cfg.dirac_init:
        done.append(f"identity init of {len(dirac_init(model))} convolutions")
    if cfg.whiten:
        name = whiten_init(model, x_uint8, preprocessing, **cfg.whiten)
        done.append(f"whitening init of {name} from {min(cfg.whiten['images'], len(x_uint8)):,} "
                    f"images")
    return done


class Lookahead:
    """airbench's lookahead: every `every` steps, at global step t (1-based) of T,

        a = decay * (t / T) ** power
        ema <- a * ema + (1 - a) * w      (every weight, BatchNorm statistics included)
        w   <- ema

    and after the last step w <- ema. Early on a ~ 0 (no effect); towards the end the
    weights average over the last few hundred steps. ema starts as the initial weights."""

    def __init__(self, every: int = 5, decay: float = 0.95 ** 5, power: float = 3.0):
        self.every, self.decay, self.power = every, decay, power
        self.ema: dict[str, np.ndarray] | None = None

    def start(self, weights: dict):
        if self.ema is None:
            self.ema = {k: np.array(v, np.float32) for k, v in weights.items()}

    def after_step(self, backend, t: int, total: int):
        """Called after global step t (1-based); updates the backend's weights in place."""
        if t % self.every and t < total:
            return
        w = backend.export_weights()
        if t % self.every == 0:
            a = np.float32(self.decay * (t / total) ** self.power)
            for k, e in self.ema.items():
                e += (np.float32(1) - a) * (w[k] - e)
        backend.set_weights({k: v.copy() for k, v in self.ema.items()})

    # checkpoint ------------------------------------------------------------------
    def tensors(self) -> dict:
        return {} if self.ema is None else {f"ema.{k}": v for k, v in self.ema.items()}

    def load_tensors(self, tensors: dict):
        ema = {k[4:]: np.array(v, np.float32) for k, v in tensors.items()
               if k.startswith("ema.")}
        self.ema = ema or None

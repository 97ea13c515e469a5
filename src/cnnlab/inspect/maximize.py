"""Activation maximization: synthetic inputs that excite a chosen filter or class.

Gradient ascent from faint noise, in pixel space u in [0, 1] (the model sees
x = low + (high - low) * u, the preprocessed image of u). Each step:

    s  = a random shift in [-jitter, jitter]^2                  (jitter)
    g  = roll(d a(roll(u, s)) / du, -s) / rms(...)              (normalized ascent direction)
    u <- u + lr * (g - tv * d TV(u) / du)                       (total variation penalty)
    u <- GaussianBlur_sigma(u)      every `blur_every` steps   (a frequency penalty)
    u <- clip(u, 0, 1)                                          (the valid pixel range)

with TV(u) = sum over neighbouring pixels of (u_p - u_q)^2, whose gradient is
2 * (4 u - sum of the 4 neighbours), replicate boundary: a discrete -Laplacian.

The objective a(x): for a channel c of a conv layer, the mean of its output
(after the activation, as the feature maps show it) over the positions at least
`border_margin` away from the border, where padding distorts; for a Dense layer, the unit's
value. The class logits are taken before softmax. Where a ReLU is off at every
position the gradient is zero; such rows follow the pre-activation gradient until
the channel comes alive.
"""
from __future__ import annotations

import math

import numpy as np

from ._common import (class_names, engine_for, hide_axes, input_range, layer_index,
                      layer_label, layer_output, logits_layer, show, to_input)
from .figures import new_figure


def border_margin(h, w) -> int:
    """Positions left out at each border of an h x w map: 2 from 10x10 up, 1 from 5x5."""
    return 2 if min(h, w) >= 10 else 1 if min(h, w) >= 5 else 0


def _mask(model, layer) -> np.ndarray:
    """Weights of the objective over one channel: a mean over the inner positions."""
    shape = model.layer_shapes[layer][1]
    if len(shape) == 1:
        return np.ones((), np.float32)
    h, w = shape[:2]
    m = border_margin(h, w)
    mask = np.zeros((h, w), np.float32)
    mask[m:h - m, m:w - m] = 1.0 / ((h - 2 * m) * (w - 2 * m))
    return mask


def _seed(model, layer, channels):
    """Seed selecting channel channels[b] for row b, weighted by the mask."""
    seed = np.zeros((len(channels), *model.layer_shapes[layer][1]), np.float32)
    mask = _mask(model, layer)
    for b, c in enumerate(channels):
        seed[b, ..., c] = mask
    return seed


def objective(model, layer, channels, images, engine="auto", batch_size=256) -> np.ndarray:
    """The maximized value a_c(x) for every image and channel -> (N, len(channels))."""
    eng = engine_for(model, engine)
    i = logits_layer(model) if layer == "logits" else layer_index(model, layer)
    out = layer_output(eng, model, to_input(model, images), i,
                       pre_activation=i == logits_layer(model), batch_size=batch_size)
    mask = _mask(model, i)
    if out.ndim == 4:
        out = np.einsum("nhwc,hw->nc", out, mask)
    return out[:, list(channels)]


def _tv_grad(u):
    """Gradient of sum (u_p - u_q)^2 over vertical and horizontal neighbours."""
    p = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return 2 * (4 * u - p[:, :-2, 1:-1] - p[:, 2:, 1:-1] - p[:, 1:-1, :-2] - p[:, 1:-1, 2:])


def gaussian_blur(u, sigma):
    """Separable Gaussian blur of (N, H, W, C) images, reflecting at the borders."""
    if sigma <= 0:
        return u
    r = max(1, math.ceil(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        p = np.pad(u, pad, mode="reflect")
        n = u.shape[axis]
        u = sum(w * np.take(p, np.arange(t, t + n), axis=axis) for t, w in enumerate(k))
    return u.astype(np.float32)


def maximize(model, layer, channels, steps=128, lr=0.05, jitter=2, tv=0.05, blur_sigma=0.5,
             blur_every=4, seed=0, engine="auto"):
    """The optimization alone -> (pixels (K, H, W, C) in [0, 1], start a (K,), final a (K,))."""
    eng = engine_for(model, engine)
    i = layer_index(model, layer)
    logits = i == logits_layer(model)
    lo, hi = input_range(model)
    target = _seed(model, i, list(channels))
    rng = np.random.default_rng(seed)
    u = np.clip(0.5 + 0.05 * rng.standard_normal((len(target), *model.input_shape)),
                0, 1).astype(np.float32)

    def value(u):
        out, _ = eng.vjp(lo + (hi - lo) * u, i, target, pre_activation=logits)
        return (out * target).reshape(len(u), -1).sum(1)

    def gradient(u):
        _, g = eng.vjp(lo + (hi - lo) * u, i, target, pre_activation=logits)
        dead = ~g.reshape(len(g), -1).any(1)
        if dead.any():  # ReLU off everywhere: climb the pre-activation instead
            _, pre = eng.vjp(lo + (hi - lo) * u[dead], i, target[dead], pre_activation=True)
            g[dead] = pre
        return g * (hi - lo)

    start = value(u)
    for t in range(steps):
        dy, dx = rng.integers(-jitter, jitter + 1, size=2) if jitter else (0, 0)
        g = np.roll(gradient(np.roll(u, (dy, dx), axis=(1, 2))), (-dy, -dx), axis=(1, 2))
        g /= np.sqrt((g ** 2).mean(axis=(1, 2, 3), keepdims=True)) + 1e-8
        u = u + lr * (g - tv * _tv_grad(u))
        if blur_every and (t + 1) % blur_every == 0:
            u = gaussian_blur(u, blur_sigma)
        u = np.clip(u, 0, 1).astype(np.float32)
    return u, start, value(u)


def activation_maximization(model, layer, channels=None, *, steps=128, lr=0.05, jitter=2,
                            tv=0.05, blur_sigma=0.5, blur_every=4, seed=0, real_images=None,
                            engine="auto"):
    """Synthetic inputs maximizing each chosen channel of `layer`, all optimized together
    as one batch -> (images, activations, fig).

    layer: index or name; "logits" (or the last layer) maximizes class logits.
    channels: default the first 16 (all classes for the logits).
    images: (K, H, W, C) pixels in [0, 1] (they can be fed back to the model).
    activations: {"channels", "start" (the noise), "reached"} and, when real_images are
    given, "real_mean" and "real_max" of the same objective over those images.
    """
    eng = engine_for(model, engine)
    i = logits_layer(model) if layer == "logits" else layer_index(model, layer)
    n_out = model.layer_shapes[i][1][-1]
    if channels is None:
        channels = range(n_out if i == logits_layer(model) else min(n_out, 16))
    channels = [int(c) for c in channels]
    if not channels or min(channels) < 0 or max(channels) >= n_out:
        raise ValueError(f"channels must lie in 0..{n_out - 1}")
    images, start, reached = maximize(model, i, channels, steps=steps, lr=lr, jitter=jitter,
                                      tv=tv, blur_sigma=blur_sigma, blur_every=blur_every,
                                      seed=seed, engine=eng)
    acts = {"channels": np.array(channels), "start": start, "reached": reached}
    if real_images is not None and len(real_images):
        real = objective(model, i, channels, real_images, engine=eng)
        acts["real_mean"], acts["real_max"] = real.mean(0), real.max(0)
        acts["real_images"] = len(real)
    return images, acts, maximization_figure(model, i, images, acts, steps)


def maximization_figure(model, layer, images, acts, steps=None):
    """The synthetic images titled with the value each reaches (and the real images' max)."""
    is_logits = layer == logits_layer(model)
    names = class_names(model, model.layer_shapes[layer][1][-1]) if is_logits else None
    k = len(images)
    cols = min(k, 8)
    rows = math.ceil(k / cols)
    fig = new_figure(max(7.0, 1.75 * cols), 2.1 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for b, ax in enumerate(axes):
        if b >= k:
            hide_axes(ax)
            continue
        c = int(acts["channels"][b])
        show(ax, images[b])
        head = f"class {names[c]}" if is_logits else f"filter {c}"
        text = f"{head}\n{acts['reached'][b]:.3g}"
        if "real_max" in acts:
            text += f" (real max {acts['real_max'][b]:.3g})"
        ax.set_title(text, fontsize=8)
    name = f"the class logits ({layer_label(model, layer)})" if is_logits else \
        layer_label(model, layer)
    what = "each logit before softmax" if is_logits else \
        "channel mean away from the border" if len(model.layer_shapes[layer][1]) == 3 else \
        "unit value"
    real = f" (in brackets: the largest over {acts['real_images']:,} real test images)" \
        if "real_max" in acts else ""
    after = f" after {steps} steps" if steps else ""
    fig.suptitle(f"Activation maximization of {name}: {what}{after}\n"
                 f"under each image: the value it reaches{real}", fontsize=10,
                 fontweight="bold")
    return fig


"""Which pixels matter: occlusion sensitivity, gradient saliency and Grad-CAM."""
from __future__ import annotations

import numpy as np

from ._common import (as_batch, class_names, conv_layers, engine_for, hide_axes, layer_index,
                      layer_label, logits_layer, normalize01, show, to_input, to_pixels,
                      upsample)
from .figures import new_figure


def _labels(eng, model, x, labels):
    """The given labels, or the predicted classes."""
    if labels is None:
        return eng.predict_proba(x).argmax(1)
    return np.asarray(labels, np.int64).reshape(-1)


def _logit_seed(model, labels):
    seed = np.zeros((len(labels), model.layer_shapes[logits_layer(model)][1][-1]), np.float32)
    seed[np.arange(len(labels)), labels] = 1.0
    return seed


def patch_positions(size, patch, stride):
    """Top-left corners along one axis; the last patch always touches the border."""
    last = max(size - patch, 0)
    pos = list(range(0, last + 1, stride))
    return pos if pos[-1] == last else pos + [last]


def occlusion(model, images, labels, patch=4, stride=2, fill=None, engine="auto",
              batch_size=512):
    """Occlusion sensitivity -> (heatmaps (N, H, W), fig).

    For image x of class c and each patch position P, x_P is x with the patch P set to
    `fill`; the drop is d_P = p_c(x) - p_c(x_P). A pixel's heat is the mean of d_P over
    the patches covering it: high where hiding the pixel costs the true class most.
    fill: a pixel value in [0, 1]; default the value whose preprocessed input is 0
    (the training mean with standardization, else black). Every occluded copy of every
    image goes through the model in one predict call."""
    eng = engine_for(model, engine)
    images = as_batch(images, model)
    x = to_input(model, images)
    labels = np.asarray(labels, np.int64).reshape(-1)
    n, h, w, _ = x.shape
    value = 0.0 if fill is None else \
        to_input(model, np.full((1, *x.shape[1:]), fill, np.float32))[0, 0, 0]  # (C,)
    corners = [(i, j) for i in patch_positions(h, patch, stride)
               for j in patch_positions(w, patch, stride)]
    occluded = np.repeat(x[:, None], len(corners), axis=1)
    for k, (i, j) in enumerate(corners):
        occluded[:, k, i:i + patch, j:j + patch] = value
    probs = eng.predict_proba(np.concatenate([x, occluded.reshape(-1, *x.shape[1:])]),
                              batch_size)
    base = probs[np.arange(n), labels]
    p_occ = probs[n:].reshape(n, len(corners), -1)[np.arange(n), :, labels]  # (N, positions)
    drop = base[:, None] - p_occ
    total = np.zeros((n, h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    for k, (i, j) in enumerate(corners):
        total[:, i:i + patch, j:j + patch] += drop[:, k, None, None]
        count[i:i + patch, j:j + patch] += 1
    heat = total / np.maximum(count, 1)
    names = class_names(model)
    titles = [f"{names[c]}: p={p:.2f}\nmax drop {m:.2f}" for c, p, m in
              zip(labels, base, heat.reshape(n, -1).max(1))]
    fig = _overlay_figure(images, heat, titles, "RdBu_r", "drop in p(true)",
                          f"Occlusion sensitivity ({patch}x{patch} patch, stride {stride})\n"
                          "red: hiding this region lowers the true class's probability",
                          symmetric=True)
    return heat, fig


def saliency(model, images, labels=None, engine="auto"):
    """Gradient saliency -> (gradients (N, H, W, C), fig).

    The gradient of the class logit z_c (before softmax) with respect to the model's
    (preprocessed) input, d z_c / d x; for a linear model it is the class's weights.
    The figure shows max over channels of |d z_c / d x|, each map scaled to [0, 1]."""
    eng = engine_for(model, engine)
    images = as_batch(images, model)
    x = to_input(model, images)
    labels = _labels(eng, model, x, labels)
    _, grads = eng.vjp(x, logits_layer(model), _logit_seed(model, labels), pre_activation=True)
    names = class_names(model)
    heat = normalize01(np.abs(grads).max(-1))
    fig = _overlay_figure(images, heat, [names[c] for c in labels], "inferno",
                          "|gradient| / its max",
                          "Gradient saliency\n|d logit(class) / d input|, max over channels",
                          overlay=False)
    return grads, fig


def grad_cam(model, images, labels=None, layer=None, method="gradcam", engine="auto"):
    """Grad-CAM -> (maps (N, H, W) in [0, 1], fig).

    A = the output of the last conv layer (after its activation), z_c the class logit:
    w_k = mean_ij d z_c / d A_ijk,  map = relu(sum_k w_k A_k), bilinearly upsampled to
    the image and divided by its maximum.
    method="hirescam" keeps the gradient per position, map = relu(sum_k dz_c/dA_k * A_k):
    with a Flatten + Dense head the spatial mean of the gradient often cancels (the
    Grad-CAM map is then zero everywhere), while this product stays faithful."""
    if method not in ("gradcam", "hirescam"):
        raise ValueError(f"unknown method {method!r}; allowed: gradcam, hirescam")
    eng = engine_for(model, engine)
    images = as_batch(images, model)
    x = to_input(model, images)
    labels = _labels(eng, model, x, labels)
    if layer is None:
        convs = conv_layers(model)
        if not convs:
            raise ValueError("Grad-CAM needs a convolutional layer; the model has none")
        layer = convs[-1][1]
    a_idx = layer_index(model, layer)
    activation = eng.activations(x)[a_idx][1]                       # A: (N, h, w, K)
    _, grads = eng.vjp(x, logits_layer(model), _logit_seed(model, labels), wrt_layer=a_idx,
                       pre_activation=True)
    weights = grads.mean(axis=(1, 2), keepdims=True) if method == "gradcam" else grads
    cam = np.maximum((weights * activation).sum(-1), 0)             # (N, h, w)
    maps = normalize01(upsample(cam, x.shape[1:3]))
    names = class_names(model)
    titles = [names[c] + ("" if m.any() else "\n(map <= 0 everywhere)")
              for c, m in zip(labels, maps)]
    what = "Grad-CAM" if method == "gradcam" else "HiResCAM (gradient x activation)"
    fig = _overlay_figure(images, maps, titles, "jet", "map / its max",
                          f"{what}\non {layer_label(model, a_idx)} "
                          f"({activation.shape[1]}x{activation.shape[2]}, upsampled)")
    return maps, fig


def _overlay_figure(images, heat, titles, cmap, label, title, symmetric=False, overlay=True):
    """Images on the top row; the maps below (over a faded copy of the image when overlay)."""
    n = len(images)
    fig = new_figure(max(6.5, 1.7 * n + 1.0), 4.6)
    axes = np.atleast_2d(fig.subplots(2, n, squeeze=False))
    pixels = to_pixels(images)
    lim = float(np.abs(heat).max()) or 1.0
    vmin, vmax = (-lim, lim) if symmetric else (0.0, 1.0)
    for k in range(n):
        show(axes[0, k], pixels[k])
        axes[0, k].set_title(titles[k], fontsize=8.5)
        ax = axes[1, k]
        if overlay:
            grey = pixels[k].mean(-1)
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            im = ax.imshow(heat[k], cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.6,
                           interpolation="bilinear")
        else:
            im = ax.imshow(heat[k], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        hide_axes(ax)
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.9, label=label)
    fig.suptitle(title, fontweight="bold", fontsize=10.5)
    return fig

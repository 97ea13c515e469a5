"""Helpers shared by the inspection modules: engines, pixels, layers, upsampling."""
from __future__ import annotations

import numpy as np

from .. import inputs
from ..engines import get_engine
from ..preprocess import preprocessing_of


def engine_for(model, engine="auto"):
    """An engine instance: pass one through, or build one by name."""
    return engine if hasattr(engine, "vjp") else get_engine(model, engine)


def as_batch(images, model=None) -> np.ndarray:
    """Images as an (N, H, W, C) array: uint8, or float in [0, 1]. A single image gets N = 1."""
    return inputs.as_batch(images, None if model is None else model.input_shape)


def to_input(model, images) -> np.ndarray:
    """uint8 or [0, 1] float images -> the model's preprocessed float32 input."""
    return inputs.model_input(model, images)


def to_pixels(images) -> np.ndarray:
    """uint8 or [0, 1] float images -> float32 in [0, 1] for display."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)
    return np.clip(x, 0, 1)


def input_range(model):
    """Per-channel (low, high) of the preprocessed input when pixels span [0, 1]:
    low = (0 - mean) / std, high = (1 - mean) / std."""
    prep = preprocessing_of(model)
    c = model.input_shape[-1]
    mean = np.broadcast_to(np.asarray(prep["mean"], np.float32), (c,))
    std = np.broadcast_to(np.asarray(prep["std"], np.float32), (c,))
    return (0 - mean) / std, (1 - mean) / std


def show(ax, image, **kw):
    """imshow one (H, W, C) image in [0, 1]: grey for 1 channel, RGB for 3, channel mean else."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] != 3:
        img = img.mean(-1)
    if img.ndim == 2:
        kw = {"cmap": "gray", "vmin": 0, "vmax": 1, **kw}
    ax.imshow(img, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def hide_axes(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def class_names(model, n=None) -> list[str]:
    names = list(model.meta.get("class_names") or [])
    n = model.num_classes if n is None else n
    return [str(c) for c in names] + [str(i) for i in range(len(names), n)]


def layer_index(model, layer) -> int:
    """A layer given by index (negative allowed) or by name -> its index."""
    n = len(model.layers)
    if isinstance(layer, (int, np.integer)):
        if not -n <= layer < n:
            raise ValueError(f"layer {layer}: the model has {n} layers")
        return int(layer) % n
    for i, lay in enumerate(model.layers):
        if lay.name == layer:
            return i
    names = ", ".join(lay.name for lay in model.layers)
    raise ValueError(f"no layer named {layer!r}; layers: {names}")


def logits_layer(model) -> int:
    """The layer whose pre-activation output is the class logits."""
    i = model.final_activation_index
    return len(model.layers) - 1 if i is None else i


def layer_label(model, i) -> str:
    """A layer's name; 'conv + activation' for an Activation layer right after a conv."""
    name = model.layers[i].name
    if model.layers[i].type == "Activation" and i > 0:
        name = f"{model.layers[i - 1].name} + {name}"
    return name


def conv_layers(model) -> list[tuple[int, int]]:
    """(conv index, shown index) per Conv2D: shown is the layer after it when that is a
    separate Activation, so feature maps are seen after their nonlinearity."""
    out = []
    for i, layer in enumerate(model.layers):
        if layer.type == "Conv2D":
            j = i + 1 if i + 1 < len(model.layers) and model.layers[i + 1].type == "Activation" \
                else i
            out.append((i, j))
    return out


def layer_output(eng, model, x, layer, pre_activation=False, batch_size=256) -> np.ndarray:
    """Output of layer `layer` (NHWC) for preprocessed x, optionally before its activation."""
    shape = model.layer_shapes[layer][1]
    outs = [eng.layer_output(x[i:i + batch_size], layer, pre_activation=pre_activation)
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, *shape), np.float32)


def predict(eng, model, images, batch_size=512) -> np.ndarray:
    """Class probabilities for uint8 / [0, 1] images, preprocessing in chunks."""
    chunks = [eng.predict_proba(to_input(model, images[i:i + 4096]), batch_size)
              for i in range(0, len(images), 4096)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.num_classes), np.float32)


def upsample(maps, size) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, H, W), pixel centres aligned."""
    maps = np.asarray(maps, np.float32)
    (h, w), (H, W) = maps.shape[1:], size

    def axis(n_in, n_out):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def normalize01(maps) -> np.ndarray:
    """Scale each map to [0, 1] by its own maximum (all-zero maps stay zero)."""
    maps = np.asarray(maps, np.float32)
    top = maps.reshape(len(maps), -1).max(1).reshape(-1, *([1] * (maps.ndim - 1)))
    return np.divide(maps, top, out=np.zeros_like(maps), where=top > 0)

"""Turning a drawing (or an uploaded image) into what the model was trained on.

NumPy and Pillow only. Two paths, chosen by `mode_for(model)`:

"drawing" (models with a 28x28x1 input trained on MNIST-style data, e.g. MNIST and
EMNIST): the steps that made MNIST itself.

  1. Decode; transparency is composited onto a background that contrasts with the
     ink (a canvas exports dark strokes on a transparent background: they land on
     white), then grey (ITU-R 601 luma).
  2. Polarity: the training data has light ink on a dark background. The background
     level is the median of the border pixels; a light background is inverted.
  3. Contrast: the background level maps to 0 and the brightest ink to 255, so a
     photo of pencil on paper looks like the data. An image with (almost) no
     contrast is empty: nothing to classify.
  4. Crop to the bounding box of the ink (pixels above 20% of the ink level).
  5. Scale so the longer side is 20 px (24 px for EMNIST), keeping the aspect
     ratio, with Pillow's antialiased Lanczos filter.
  6. Paste into a 28x28 black image so that the ink's centre of mass lands on pixel
     (14, 14), where it is in MNIST (EMNIST: the box's centre).

"resize" (any other model, e.g. CIFAR-10 32x32x3, Fashion-MNIST): the image is
converted as `cnnlab.datasets.load_image` converts files for prediction (resized to
the input size, grey or RGB), except that transparency goes onto the contrasting
background of step 1 rather than always onto black. A blank image is empty.

Both give uint8 (H, W, C); the model's own normalization (`cnnlab.preprocess.apply`)
comes after. Images are refused before decoding when they have more than
`MAX_PIXELS` pixels (decompression bombs).
"""
from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, ImageStat

MAX_PIXELS = 12_000_000  # e.g. a 4000x3000 photo; larger images are refused unread
MIN_CONTRAST = 24        # grey levels between background and ink below which nothing is drawn
INK_THRESHOLD = 0.2      # fraction of the ink level that counts for the bounding box
MODES = ("auto", "drawing", "resize")
RESAMPLE = Image.Resampling.LANCZOS

_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.+-]+)*;base64,", re.I)


class ImageInputError(ValueError):
    """Input that is not a usable image; the message is one line for the client."""


# decoding ----------------------------------------------------------------------------
def decode_data_url(text) -> bytes:
    """'data:image/png;base64,...' (or bare base64) -> bytes."""
    if not isinstance(text, str) or not text:
        raise ImageInputError("'image' must be a data URL string such as "
                              "'data:image/png;base64,...'")
    m = _DATA_URL.match(text)
    payload = text[m.end():] if m else text
    if not m and text.startswith("data:"):
        raise ImageInputError("'image' must be a base64 data URL ('data:image/png;base64,...')")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("'image' is not valid base64") from None
    if not data:
        raise ImageInputError("'image' is empty")
    return data


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> a decoded Pillow image (first frame, EXIF orientation applied).

    The size is checked from the header before any pixel is decoded."""
    from ..datasets import DatasetError
    from ..datasets.images import decode_image
    try:
        return decode_image(data, max_pixels, name="upload")
    except DatasetError as e:
        raise ImageInputError(str(e)) from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def flatten(img: Image.Image) -> Image.Image:
    """Decoded image -> 'L' or 'RGB'. Without transparency this is the conversion of
    `cnnlab.datasets` (16-bit grey scaled, palettes expanded); transparency is
    composited onto a background that contrasts with the ink: white under dark ink
    (a canvas's strokes on its transparent background), black under light ink."""
    from ..datasets.images import _flatten, _grey_palette
    if not _has_alpha(img):
        return _flatten(img)
    grey_src = img.mode in ("LA", "La", "L") or (img.mode in ("P", "PA") and _grey_palette(img))
    rgba = img.convert("RGBA")
    opaque = rgba.getchannel("A").point(lambda v: 255 if v > 127 else 0)
    stat = ImageStat.Stat(rgba.convert("L"), opaque)
    dark_ink = stat.count[0] > 0 and stat.mean[0] < 128
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if dark_ink else (0, 0, 0, 255))
    return Image.alpha_composite(bg, rgba).convert("L" if grey_src else "RGB")


def to_grey(img: Image.Image) -> np.ndarray:
    """Decoded image -> float32 (H, W) grey levels 0..255 (see `flatten`)."""
    return np.asarray(flatten(img).convert("L"), dtype=np.float32)


# the MNIST steps ------------------------------------------------------------------------
def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]) if min(a.shape) > 1 \
        else a.ravel()


def normalize_ink(grey: np.ndarray):
    """float (H, W) grey -> float (H, W) in [0, 1], light ink on black; None when empty."""
    bg = float(np.median(_border(grey)))
    if bg > 127.5:
        grey, bg = 255.0 - grey, 255.0 - bg
    peak = float(grey.max())
    if peak - bg < MIN_CONTRAST:
        return None
    return np.clip((grey - bg) / (peak - bg), 0.0, 1.0)


def mnist_like(grey: np.ndarray, box: int = 20, size: int = 28, center: str = "mass"):
    """float (H, W) grey 0..255 -> uint8 (size, size) as MNIST was made; None when empty.

    box: the longer side of the scaled ink; center: 'mass' (MNIST) or 'box' (EMNIST)."""
    ink = normalize_ink(np.asarray(grey, np.float32))
    if ink is None:
        return None
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    if not len(rows):
        return None
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pil = Image.fromarray((crop * 255.0).astype(np.float32), mode="F")
    small = np.asarray(pil.resize((nw, nh), RESAMPLE), dtype=np.float32)
    small = np.clip(small, 0.0, 255.0)
    if center == "mass" and small.sum() > 0:
        ys, xs = np.indices(small.shape)
        cy, cx = (ys * small).sum() / small.sum(), (xs * small).sum() / small.sum()
    else:
        cy, cx = (nh - 1) / 2, (nw - 1) / 2
    mid = size / 2  # MNIST: the centre of mass is at (14, 14) in pixel indices
    oy = int(np.clip(np.floor(mid - cy + 0.5), 0, size - nh))
    ox = int(np.clip(np.floor(mid - cx + 0.5), 0, size - nw))
    out = np.zeros((size, size), np.float32)
    out[oy:oy + nh, ox:ox + nw] = small
    return np.rint(out).astype(np.uint8)


# choosing the path ------------------------------------------------------------------------
def mode_for(model) -> str:
    """'drawing' for 28x28x1 models of handwriting (MNIST, EMNIST, ...), else 'resize'."""
    dataset = str((model.meta.get("training") or {}).get("dataset") or "").lower()
    if tuple(model.input_shape) == (28, 28, 1) and "fashion" not in dataset:
        return "drawing"
    return "resize"


def layout_for(model) -> dict:
    """Box size and centring of the drawing path for this model's training data."""
    dataset = str((model.meta.get("training") or {}).get("dataset") or "").lower()
    if dataset.startswith("emnist"):
        return {"box": 24, "center": "box"}
    return {"box": 20, "center": "mass"}


def prepare(model, data: bytes, mode: str = "auto", max_pixels: int = MAX_PIXELS):
    """Image bytes -> (uint8 (H, W, C) for the model or None when nothing is drawn,
    the path taken: 'drawing' or 'resize').

    Raises ImageInputError for anything that is not a usable image."""
    if mode not in MODES:
        raise ImageInputError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    h, w, c = model.input_shape
    if mode == "auto":
        mode = mode_for(model)
    if c != 1 or h != w:
        mode = "resize"  # the MNIST steps need a square grey input
    img = open_image(data, max_pixels)
    if mode == "drawing":
        layout = layout_for(model)
        out = mnist_like(to_grey(img), box=max(1, round(layout["box"] * h / 28)), size=h,
                         center=layout["center"])
        return (None if out is None else out[..., None]), mode
    flat = flatten(img)
    if np.ptp(np.asarray(flat)) == 0:
        return None, mode  # a blank image, e.g. an untouched canvas
    from ..datasets.images import image_to_array
    return image_to_array(flat, (h, w), c), mode


# encoding ------------------------------------------------------------------------------------
def png_data_url(a: np.ndarray) -> str:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> 'data:image/png;base64,...'."""
    a = np.asarray(a, np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

"""Turning a drawing (or an uploaded image) into what the model was trained on.

NumPy and Pillow only. Two paths, chosen by `mode_for(model)`:

"drawing" (models with a 28x28x1 input trained on MNIST-style data, e.g. MNIST and
EMNIST): the steps that made MNIST itself.

  1. Decode (shrunk to at most 1024 px on the longer side, see `open_image`);
     transparency is composited onto a background that contrasts with the ink (a
     canvas exports dark strokes on a transparent background: they land on white),
     then grey (ITU-R 601 luma).
  2. Polarity: the training data has light ink on a dark background. The background
     level is the median of the border pixels; a light background is inverted
     (in uneven light, see `dark_ink`).
  3. Light and contrast: the paper's light is estimated (`paper_light`: a grey
     closing that removes the ink, refined on the paper pixels) and divided out, so
     a shadow over a corner is not taken for ink; evenly lit paper is one level.
     The background maps to 0 and the darkest ink to 255, so a photo of pencil on
     paper looks like the data. An image with (almost) no contrast is empty:
     nothing to classify.
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
`MAX_PIXELS` pixels (`MAX_JPEG_PIXELS` for JPEG, decoded at reduced scale), and at
most `DECODE_SLOTS` images of more than `LARGE_PIXELS` are decoded at once: together
they bound the memory a server needs (decompression bombs, many large uploads).
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import threading
import warnings
from contextlib import nullcontext

import numpy as np
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

MAX_PIXELS = 8_388_608        # 2^23 pixels: a 4K screenshot; larger images are refused unread
MAX_JPEG_PIXELS = 50_000_000  # a 50 MP phone photo (JPEG decodes at 1/8 of its size)
WORK_SIDE = 1024              # decoded images are shrunk to at most this longer side
LARGE_PIXELS = 1_000_000      # decodes above this wait for a slot of `decode_gate`
DECODE_SLOTS = 2
decode_gate = threading.BoundedSemaphore(DECODE_SLOTS)
NOT_AN_IMAGE = "this file is not an image we can read: PNG, JPEG, GIF, BMP, WebP"
MIN_CONTRAST = 24        # grey levels between background and ink below which nothing is drawn
INK_THRESHOLD = 0.2      # fraction of the ink level that counts for the bounding box
MODES = ("auto", "drawing", "resize")
RESAMPLE = Image.Resampling.LANCZOS
BG_GRID = 64             # the paper's light is estimated on at most 64 x 64 box averages
BG_WINDOW = 0.25         # closing window, a fraction of the longer side: wider than a stroke
PAPER_STEPS = ((0.25, 4), (0.12, 2))  # (ink threshold, blur radius) of the refinements
TAIL = 0.5               # percent of pixels in each tail for `dark_ink`
BG_FLAT = 24             # grey levels of variation below which the light counts as even

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


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, *,
               max_jpeg_pixels: int = MAX_JPEG_PIXELS, gate=None) -> Image.Image:
    """Bytes -> a decoded Pillow image (first frame, EXIF orientation applied), with its
    longer side brought down to at most WORK_SIDE.

    The size is checked from the header before any pixel is decoded: at most max_pixels
    (max_jpeg_pixels for JPEG, which decodes at 1/2, 1/4 or 1/8 of its size with
    `Image.draft`). Other formats are decoded whole, then shrunk by an integer factor
    (`Image.reduce`, box averages). Decodes of more than LARGE_PIXELS pixels run inside
    `gate` (default: `decode_gate`, a semaphore), so that only a few big images are in
    memory at once."""
    if not data:
        raise ImageInputError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        try:
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageInputError(f"the image has no pixels ({w}x{h})")
            limit = max_jpeg_pixels if img.format == "JPEG" else max_pixels
            if w * h > limit:
                raise ImageInputError(f"image too large ({w}x{h}; at most "
                                      f"{limit / 1e6:.1f} megapixels)")
            with (gate or decode_gate) if w * h > LARGE_PIXELS else nullcontext():
                img.seek(0)
                if img.format == "JPEG" and max(w, h) > WORK_SIDE:
                    img.draft(None, (max(1, w * WORK_SIDE // max(w, h)),
                                     max(1, h * WORK_SIDE // max(w, h))))
                img.load()
                small = _shrink(img)
                if small is img:
                    small = img.copy()
                img.close()  # frees the full-size pixels while the slot is held
        finally:
            img.close()
        try:
            return ImageOps.exif_transpose(small)
        except Exception:  # broken EXIF: keep the stored orientation
            return small
    except ImageInputError:
        raise
    except Image.DecompressionBombError:
        raise ImageInputError("image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageInputError(NOT_AN_IMAGE) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error,
            MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageInputError(f"cannot read the image (truncated or corrupt?): {msg}") from None


def _shrink(img: Image.Image) -> Image.Image:
    """A loaded image -> itself, or box-reduced by an integer factor to <= WORK_SIDE."""
    factor = -(-max(img.size) // WORK_SIDE)
    if factor <= 1:
        return img
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode.startswith("I;"):
        img = img.convert("I")  # 16-bit grey; `flatten` scales it to 8 bits
    elif img.mode == "P":
        from ..datasets.images import _grey_palette
        img = img.convert("RGBA" if _has_alpha(img) else "L" if _grey_palette(img) else "RGB")
    return img.reduce(factor)


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


def _rank(a: np.ndarray, k: int, op) -> np.ndarray:
    """Max (op=np.max) or min filter over a k x k window (k odd), edges repeated;
    separable: rows, then columns."""
    r = k // 2
    for axis in (0, 1):
        pad = [(r, r) if i == axis else (0, 0) for i in range(2)]
        win = np.lib.stride_tricks.sliding_window_view(np.pad(a, pad, mode="edge"), k, axis)
        a = op(win, axis=-1)
    return a


def _closing(a: np.ndarray, k: int) -> np.ndarray:
    return _rank(_rank(a, k, np.max), k, np.min)


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1) x (2r+1) window, edges repeated."""
    if r < 1:
        return a
    k = 2 * r + 1
    for axis in (0, 1):
        pad = [(r, r) if i == axis else (0, 0) for i in range(2)]
        c = np.moveaxis(np.cumsum(np.pad(a, pad, mode="edge"), axis=axis,
                                  dtype=np.float64), axis, 0)
        c = np.concatenate([np.zeros_like(c[:1]), c])  # c[j]: the sum of the first j
        a = np.moveaxis((c[k:] - c[:-k]) / k, 0, axis)
    return a.astype(np.float32)


def paper_light(grey: np.ndarray):
    """Dark ink on light paper, float (H, W) -> the paper's brightness under the ink,
    (H, W) float, or None when the paper is evenly lit.

    A grey closing (max filter, then min filter) with a window wider than any stroke
    removes the ink and keeps the light: smooth gradients and shadows over a corner
    (the closing of a monotone profile is the profile itself). It runs on a grid of at
    most BG_GRID x BG_GRID box averages (which also averages the sensor noise away),
    is smoothed, and is brought back to full size bilinearly."""
    h, w = grey.shape
    small = _coarse(grey)
    k = _window(small.shape)
    light = _box_blur(_closing(small, k), k // 4)
    if float(light.max() - light.min()) < BG_FLAT:
        return None
    # the closing overshoots in the bend of a shadow's edge: the mean of the paper
    # cells nearby (darker than the light by less than t) follows it closely
    for t, r in PAPER_STEPS:
        paper = (small >= light * (1.0 - t)).astype(np.float32)
        num, den = _box_blur(small * paper, r), _box_blur(paper, r)
        light = np.where(den > 0.1, num / np.maximum(den, 1e-6), light)
    if light.shape != grey.shape:
        up = Image.fromarray(light, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        light = np.asarray(up, dtype=np.float32)
    return np.maximum(light, 1.0)


def _coarse(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    scale = BG_GRID / max(h, w)
    if scale >= 1:
        return grey
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(np.ascontiguousarray(grey, np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BOX), dtype=np.float32)


def _window(shape) -> int:
    return max(3, int(BG_WINDOW * max(shape)) // 2 * 2 + 1)


def dark_ink(grey: np.ndarray) -> bool:
    """True when the ink is darker than the paper.

    An evenly lit border decides as MNIST was made: the median of the border is the
    background. A border in uneven light (a shadow) decides on the image relative to
    its local mean (a box mean BG_WINDOW wide, so the light cancels out): ink is a thin
    minority far from the mean, so the longer tail of log(grey / mean) is the ink's
    side; shadow edges are smooth and give both tails alike."""
    border = _border(grey)
    lo, hi = np.percentile(border, [10, 90])
    if hi - lo <= BG_FLAT:
        return float(np.median(border)) > 127.5
    small = _coarse(grey)
    mean = _box_blur(small, _window(small.shape) // 2)
    if mean.shape != grey.shape:
        h, w = grey.shape
        mean = np.asarray(Image.fromarray(mean, mode="F").resize(
            (w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    r = np.log(np.maximum(grey, 1.0) / np.maximum(mean, 1.0))
    lo, mid, hi = np.percentile(r, [TAIL, 50, 100 - TAIL])
    return mid - lo >= hi - mid


def normalize_ink(grey: np.ndarray):
    """float (H, W) grey -> float (H, W) in [0, 1], light ink on black; None when empty.

    Made dark ink on light paper (inverted if needed, see `dark_ink`). Evenly lit: the
    paper level p is the median of the border and ink = (p - grey) / (p - darkest), as
    in MNIST. In uneven light (`paper_light` varies by more than BG_FLAT levels) the
    paper's light P(x) is divided out first: ink = 1 - grey / P(x), so a shadow is not
    taken for ink; then scaled so the darkest ink is 1."""
    grey = np.asarray(grey, np.float32)
    if not dark_ink(grey):
        grey = 255.0 - grey
    light = paper_light(grey)
    if light is None:
        paper = float(np.median(_border(grey)))
        depth = paper - float(grey.min())
        if depth < MIN_CONTRAST:
            return None
        return np.clip((paper - grey) / depth, 0.0, 1.0)
    if float((light - grey).max()) < MIN_CONTRAST:
        return None
    ink = np.clip(1.0 - grey / light, 0.0, 1.0)
    return ink / float(ink.max())


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


def prepare(model, data: bytes, mode: str = "auto", max_pixels: int = MAX_PIXELS, *,
            gate=None):
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
    img = open_image(data, max_pixels, gate=gate)
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

"""Turning image files into uint8 arrays, the same way for training and prediction.

Every image goes through one path: first frame, EXIF orientation applied,
16-bit grey scaled to 8 bits, any transparency composited onto black (MNIST-like
data is light ink on a dark background; nothing is inverted), resized to
(H, W) with Pillow's antialiased bilinear filter (aspect ratio not kept), then
made grey or RGB. Grey from colour uses Pillow's ITU-R 601 luma
(L = R*299/1000 + G*587/1000 + B*114/1000), so it equals Image.convert('L').
"""
from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import DatasetError

MAX_PIXELS = 40_000_000  # larger images are refused (decompression-bomb guard)
RESAMPLE = Image.Resampling.BILINEAR
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or getattr(src, "filename", None) or "<image data>")


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 1) uint8 grey, bit-exact with Pillow's convert('L')."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def _flatten(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB'; alpha composited onto black."""
    mode = img.mode
    if mode in ("L", "RGB"):
        if "transparency" not in img.info:
            return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit -> 8-bit
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        out = Image.alpha_composite(black, rgba)
        grey = mode in ("LA", "La", "L") or (mode in ("P", "PA") and _grey_palette(img))
        return out.convert("L" if grey else "RGB")
    if mode == "P":
        return img.convert("L" if _grey_palette(img) else "RGB")
    return img.convert("RGB")


def _grey_palette(img: Image.Image) -> bool:
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def decode_image(src, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Open and fully decode the first frame of an image (a path, file object or bytes),
    EXIF orientation applied. The pixel count is checked from the header before any
    pixel is decoded (decompression bombs). Raises DatasetError naming the image."""
    name = name or _name(src)
    max_pixels = max_pixels or MAX_PIXELS
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise DatasetError(f"{name}: the image is empty (0 bytes)")
        src = io.BytesIO(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as opened:
                w, h = opened.size
                if w < 1 or h < 1:
                    raise DatasetError(f"{name}: the image has no pixels ({w}x{h})")
                if w * h > max_pixels:
                    raise DatasetError(f"{name}: image too large ({w}x{h}; at most "
                                       f"{max_pixels / 1e6:g} megapixels)")
                opened.seek(0)
                opened.load()
                try:
                    img = ImageOps.exif_transpose(opened)
                except Exception:  # broken EXIF: keep the stored orientation
                    img = opened
                return opened.copy() if img is opened else img  # opened is closed on exit
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(f"{name}: image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{name}: not an image Pillow can read") from None
    except FileNotFoundError:
        raise DatasetError(f"{name}: no such file") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error,
            MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{name}: cannot read image (truncated or corrupt?): {msg}") from None


def open_image(src) -> Image.Image:
    """Open and fully decode one image as 'L' or 'RGB', or raise DatasetError naming it."""
    return _flatten(decode_image(src))


def image_to_array(img: Image.Image, size=None, channels=None) -> np.ndarray:
    """'L'/'RGB' image -> uint8 (H, W, C); size is (H, W) or None, channels 1, 3 or None (keep)."""
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), RESAMPLE)
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if channels == 3 and a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif channels == 1 and a.shape[-1] == 3:
        a = luma(a)
    return a


def _check_shape(shape) -> tuple:
    try:
        h, w, c = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise DatasetError(f"shape must be (H, W, C), got {shape!r}") from None
    if h < 1 or w < 1 or c not in (1, 3):
        raise DatasetError(f"shape must be (H, W, C) with C 1 or 3, got {tuple(shape)!r}")
    return h, w, c


def load_image(path_or_fileobj, shape) -> np.ndarray:
    """One image file (path, file object or bytes) -> uint8 (H, W, C) as the model expects.

    Any size and mode is accepted; see the module docstring for the conversion.
    """
    h, w, c = _check_shape(shape)
    return image_to_array(open_image(path_or_fileobj), (h, w), c)


def resize_images(x: np.ndarray, size) -> np.ndarray:
    """Resize a uint8 (N, H, W, C) batch to (N, size[0], size[1], C), same filter as files."""
    h, w = size
    if x.shape[1:3] == (h, w):
        return x
    out = np.empty((len(x), h, w, x.shape[-1]), dtype=np.uint8)
    for i, im in enumerate(x):
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        out[i] = np.asarray(pil.resize((w, h), RESAMPLE)).reshape(h, w, -1)
    return out


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (..., C) -> (..., channels): grey repeated to RGB, or RGB to luma."""
    if x.shape[-1] == channels:
        return x
    return np.repeat(x, 3, axis=-1) if channels == 3 else luma(x)


COLORS = {"grayscale": 1, "rgb": 3}


def parse_image_size(image_size):
    """None, an int n (n x n) or (H, W) -> None or (H, W)."""
    if image_size is None:
        return None
    if isinstance(image_size, bool):
        raise DatasetError(f"image_size must be an int or (height, width), got {image_size!r}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise DatasetError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if not (1 <= h <= 4096 and 1 <= w <= 4096):
        raise DatasetError(f"image_size must be between 1 and 4096 pixels, got {(h, w)}")
    return h, w


def parse_color(color):
    """None, 'grayscale' or 'rgb' -> None, 1 or 3 channels."""
    if color is None:
        return None
    if color not in COLORS:
        raise DatasetError(f"color must be 'grayscale' or 'rgb', got {color!r}")
    return COLORS[color]

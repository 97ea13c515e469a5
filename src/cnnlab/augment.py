"""Training-time augmentation of whole batches, in NumPy (NHWC) or PyTorch (NCHW).

    cfg = check_augment({"flip": True, "translate": 0.1, "rotate": 10})
    x = augment(x, cfg, rng)   # x: float NumPy (N, H, W, C), or a torch (N, C, H, W) tensor

Keys (all optional; absent, 0 or False = off):
    translate  float < 1: max shift as a fraction of height/width (continuous),
               int: max shift in pixels (whole pixels, drawn per image and axis)
    fill       'reflect' (default) or 'zero': what shows where the image moved away
    flip       true: mirror left-right with probability 1/2;
               'alternate': each image mirrored in every other epoch (alternating_flip),
               applied by the training loop, which knows the epoch and the images' indices
    rotate     degrees: angle drawn uniformly in [-rotate, rotate]
    zoom       fraction: scale drawn uniformly in [1 - zoom, 1 + zoom]
    noise      std of added Gaussian noise (not clipped)
    crop       int p: pad p pixels on each side (with fill) then crop back at a random offset

Order: crop, flip, then translate/rotate/zoom as one affine resampling (bilinear, about
the image centre, as torch's affine_grid + grid_sample with align_corners=False), then
noise. Every random number is drawn by `draw` from a NumPy Generator (rng: a Generator or
an int seed), in one order, whatever the array type: the NumPy and the PyTorch paths give
the same result for the same seed, on any device. PyTorch is imported only for tensors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

AUGMENT_KEYS = ("translate", "fill", "flip", "rotate", "zoom", "noise", "crop")
FILLS = ("reflect", "zero")


class AugmentError(ValueError):
    """A bad augmentation config; the message names the key and what is allowed."""


def _number(key, v, lo=0.0, hi=math.inf, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AugmentError(f"augment {key!r} must be a number, got {v!r}")
    if v < lo or v > hi or (hi_open and v >= hi):
        raise AugmentError(f"augment {key!r} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
    return v


def parse_augment(text: str | None):
    """The CLI's text form, e.g. "flip,translate=0.1,rotate=10" -> a config dict;
    "none" -> {} (augmentation off)."""
    if text is None:
        return None
    if text.strip().lower() in ("none", "off", ""):
        return {}
    out = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, _, val = part.partition("=")
        if not val:
            out[key] = True
            continue
        try:
            out[key] = int(val) if val.lstrip("-").isdigit() else float(val)
        except ValueError:
            out[key] = val
    return out


def check_augment(config) -> dict:
    """Validate an augmentation config; return it normalized (only active keys, fill set)."""
    if config is None:
        return {}
    if isinstance(config, str):
        config = parse_augment(config)
    if not isinstance(config, Mapping):
        raise AugmentError(f"augment config must be a dict, got {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in AUGMENT_KEYS)
    if unknown:
        raise AugmentError(f"unknown augment key(s) {', '.join(unknown)}; allowed: {', '.join(AUGMENT_KEYS)}")
    out = {}
    t = config.get("translate")
    if t is not None and t is not False:
        t = _number("translate", t)
        if isinstance(t, float) and t >= 1:
            if not t.is_integer():
                raise AugmentError(f"augment 'translate' is a fraction (< 1) or whole pixels, got {t!r}")
            t = int(t)
        if t:
            out["translate"] = t
    for key, hi, hi_open in (("rotate", 180.0, False), ("zoom", 1.0, True), ("noise", math.inf, False)):
        v = config.get(key)
        if v is not None and v is not False and _number(key, v, 0.0, hi, hi_open):
            out[key] = float(v)
    c = config.get("crop")
    if c is not None and c is not False:
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise AugmentError(f"augment 'crop' must be a whole number of pixels >= 0, got {c!r}")
        if c:
            out["crop"] = c
    f = config.get("flip")
    if f is not None:
        if not isinstance(f, bool) and f != "alternate":
            raise AugmentError(f"augment 'flip' must be true, false or 'alternate', got {f!r}")
        if f:
            out["flip"] = f
    fill = config.get("fill", "reflect")
    if fill not in FILLS:
        raise AugmentError(f"augment 'fill' must be one of {', '.join(FILLS)}, got {fill!r}")
    if "fill" in config or any(k in out for k in ("translate", "rotate", "zoom", "crop")):
        out["fill"] = fill
    return out


AFFINE = ("translate", "rotate", "zoom")


def _uniform(rng, n, scale):
    """U[-scale, scale], (n,) float64."""
    return (rng.random(n) * 2 - 1) * scale


def draw(cfg: dict, shape, rng) -> dict:
    """Every random number for a batch of `shape` (N, H, W, C), in a fixed order:
    crop offsets (oy, ox), flip mask, the affine map theta (N, 2, 3), noise (N, H, W, C).

    theta is the inverse map in normalized coordinates (align_corners=False), as
    torch.nn.functional.affine_grid takes it: in = A @ out + b, from the image centre,
    for out = s * R(angle) * in + t."""
    n, h, w, c = shape
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    d = {}
    if "crop" in cfg:
        p = cfg["crop"]
        d["crop"] = (rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n))
    if cfg.get("flip") is True:
        d["flip"] = rng.random(n) < 0.5
    if any(k in cfg for k in AFFINE):
        angle = _uniform(rng, n, math.radians(cfg["rotate"])) if "rotate" in cfg else np.zeros(n)
        scale = 1 + _uniform(rng, n, cfg["zoom"]) if "zoom" in cfg else np.ones(n)
        t = cfg.get("translate")
        if t is None:
            tx = ty = np.zeros(n)
        elif isinstance(t, int):  # whole pixels
            tx, ty = rng.integers(-t, t + 1, n).astype(float), rng.integers(-t, t + 1, n).astype(float)
        else:
            tx, ty = _uniform(rng, n, t * w), _uniform(rng, n, t * h)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        d["theta"] = np.stack([
            np.stack([cos, sin * h / w, -(cos * tx + sin * ty) * 2 / w], 1),
            np.stack([-sin * w / h, cos, -(-sin * tx + cos * ty) * 2 / h], 1)], 1)
    if "noise" in cfg:
        d["noise"] = rng.standard_normal((n, h, w, c), dtype=np.float32)
    return d


def _active(cfg):
    return any(k in cfg for k in ("crop", *AFFINE, "noise")) or cfg.get("flip") is True


def _check_crop(cfg, h, w):
    pad = cfg["crop"]
    if cfg["fill"] == "reflect" and (pad >= h or pad >= w):
        raise AugmentError(f"augment 'crop' {pad} with fill 'reflect' needs images larger than "
                           f"{pad} pixels, got {h}x{w}")
    return pad


def augment(x, config: dict, rng=None):
    """Randomly transform a float batch: a NumPy (N, H, W, C) array, or a torch (N, C, H, W)
    tensor (same shape, dtype, device and memory format). rng: a NumPy Generator or a seed."""
    if rng is not None and not isinstance(rng, (np.random.Generator, int, np.integer)):
        raise AugmentError(f"augment draws from a NumPy Generator or an int seed, got "
                           f"{type(rng).__name__}")
    if not isinstance(x, np.ndarray):
        return _augment_torch(x, config, rng)
    cfg = check_augment(config)
    if x.ndim != 4 or x.dtype.kind != "f":
        raise AugmentError("augment expects a float array of shape (N, H, W, C)")
    if not _active(cfg) or x.shape[0] == 0:
        return x
    out = x
    if "crop" in cfg:
        _check_crop(cfg, *x.shape[1:3])
    d = draw(cfg, x.shape, rng)
    if "crop" in d:
        out = _crop_np(out, cfg["crop"], cfg["fill"], *d["crop"])
    if "flip" in d:
        out = np.where(d["flip"][:, None, None, None], out[:, :, ::-1], out)
    if "theta" in d:
        out = _grid_sample_np(out, d["theta"], cfg["fill"])
    if "noise" in d:
        out = out + d["noise"].astype(out.dtype) * out.dtype.type(cfg["noise"])
    return out.astype(x.dtype, copy=False)


def _crop_np(x, pad, fill, oy, ox):
    n, h, w, _ = x.shape
    mode = "reflect" if fill == "reflect" else "constant"
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    rows = (oy[:, None] + np.arange(h))[:, :, None]
    cols = (ox[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def _reflect(coord, size):
    """grid_sample's reflection about the pixel edges -0.5 and size - 0.5
    (align_corners=False), then clipped to [0, size - 1]."""
    span = size
    c = np.abs(coord + 0.5)
    flips = np.floor(c / span)
    extra = np.fmod(c, span)
    c = np.where(flips % 2 == 0, extra - 0.5, span - extra - 0.5)
    return np.clip(c, 0, size - 1)


def _grid_sample_np(x, theta, fill):
    """Bilinear resampling of x (N, H, W, C) at the inverse-mapped points, as
    grid_sample(affine_grid(theta), align_corners=False): output pixel (i, j) has
    normalized coordinates ((2j + 1) / W - 1, (2i + 1) / H - 1); theta maps them into the
    input, where pixel centres sit at integer coordinates (ix = ((gx + 1) W - 1) / 2)."""
    n, h, w = x.shape[:3]
    xs, ys = (2 * np.arange(w) + 1) / w - 1, (2 * np.arange(h) + 1) / h - 1
    t = theta[:, :, :, None, None]
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys[:, None] + t[:, 0, 2]      # (N, H, W)
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys[:, None] + t[:, 1, 2]
    ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
    if fill == "reflect":
        ix, iy = _reflect(ix, w), _reflect(iy, h)
    x0, y0 = np.floor(ix), np.floor(iy)
    fx, fy = ix - x0, iy - y0
    out = np.zeros(x.shape, np.float64)
    nn = np.arange(n)[:, None, None]
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)      # zeros outside
            tap = x[nn, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
            out += tap * (wy * wx * inside)[..., None]
    return out.astype(x.dtype)


def _augment_torch(x, config, rng):
    """The same transform on a float torch (N, C, H, W) tensor, with torch's own affine_grid
    and grid_sample, and the numbers of draw()."""
    import torch  # only here: NumPy callers never need it
    import torch.nn.functional as F

    cfg = check_augment(config)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise AugmentError("augment expects a float tensor of shape (N, C, H, W)")
    if not _active(cfg) or x.shape[0] == 0:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dtype, dev = x.dtype, x.device
    out = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    n, c, h, w = x.shape
    if "crop" in cfg:
        _check_crop(cfg, h, w)
    d = draw(cfg, (n, h, w, c), rng)
    if "crop" in d:
        pad = cfg["crop"]
        padded = F.pad(out, (pad, pad, pad, pad),
                       mode="reflect" if cfg["fill"] == "reflect" else "constant")
        oy, ox = (torch.from_numpy(a).to(dev) for a in d["crop"])
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        out = padded[torch.arange(n, device=dev)[:, None, None, None],
                     torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if "flip" in d:
        mask = torch.from_numpy(d["flip"]).to(dev)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    if "theta" in d:
        theta = torch.from_numpy(d["theta"]).to(device=dev, dtype=out.dtype)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        pad = "reflection" if cfg["fill"] == "reflect" else "zeros"
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode=pad, align_corners=False)
    if "noise" in d:
        noise = torch.from_numpy(d["noise"]).permute(0, 3, 1, 2).to(device=dev, dtype=out.dtype)
        out = out + noise * cfg["noise"]
    out = out.to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# --------------------------------------------------------------------------------------
# Alternating flip and test-time augmentation
# --------------------------------------------------------------------------------------
def alternating_flip(seed: int, epoch: int, idx, n_images: int) -> np.ndarray:
    """Which of the images `idx` (indices into a training set of n_images) are mirrored in
    `epoch`: a fixed random half in even epochs, the other half in odd ones,

        flip(i, epoch) = base(i) XOR (epoch is odd),  base(i) ~ Bernoulli(1/2) from seed,

    so every image is seen mirrored exactly once in any two consecutive epochs. A function
    of (seed, epoch, idx) only: a resumed run draws the same flips."""
    base = np.random.default_rng([int(seed), 0x5EED_F11B]).random(n_images) < 0.5
    return base[np.asarray(idx)] ^ bool(epoch % 2)


def flip_images(x, mask):
    """Mirror left-right the images where mask is true: NumPy (N, H, W, C) or torch
    (N, C, H, W)."""
    if isinstance(x, np.ndarray):
        return np.where(np.asarray(mask)[:, None, None, None], x[:, :, ::-1], x)
    import torch
    m = torch.as_tensor(np.asarray(mask), device=x.device)[:, None, None, None]
    out = torch.where(m, x.flip(3), x)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


TTA_LEVELS = (0, 1, 2)


def tta_logits(logits_of, x, level: int = 1):
    """Test-time augmentation of a float NHWC batch x; logits_of(batch) -> logits.

    level 0: logits_of(x). level 1: the mean over x and its mirror image,
        t1(x) = (f(x) + f(mirror x)) / 2.
    level 2 (airbench's): half that, half the mean over the two diagonal 1-pixel shifts
    (reflect padding: x moved down-right, and up-left), each with its mirror,
        t2(x) = t1(x) / 2 + (t1(shift_dr x) + t1(shift_ul x)) / 4."""
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level!r}")
    x = np.asarray(x)

    def t1(v):
        return 0.5 * (np.asarray(logits_of(v), np.float64)
                      + np.asarray(logits_of(np.ascontiguousarray(v[:, :, ::-1])), np.float64))
    if level == 0:
        return np.asarray(logits_of(x))
    if level == 1:
        return t1(x)
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    down_right, up_left = padded[:, :h, :w], padded[:, 2:, 2:]
    return 0.5 * t1(x) + 0.25 * (t1(np.ascontiguousarray(down_right))
                                 + t1(np.ascontiguousarray(up_left)))

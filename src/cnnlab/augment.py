"""Training-time augmentation of whole batches with tensor operations.

    cfg = check_augment({"flip": True, "translate": 0.1, "rotate": 10})
    x = augment(x, cfg, generator)   # x: float (N, C, H, W), any device/memory format

Keys (all optional; absent, 0 or False = off):
    translate  float < 1: max shift as a fraction of height/width (continuous),
               int: max shift in pixels (whole pixels, drawn per image and axis)
    fill       'reflect' (default) or 'zero': what shows where the image moved away
    flip       bool: mirror left-right with probability 1/2
    rotate     degrees: angle drawn uniformly in [-rotate, rotate]
    zoom       fraction: scale drawn uniformly in [1 - zoom, 1 + zoom]
    noise      std of added Gaussian noise (not clipped)
    crop       int p: pad p pixels on each side (with fill) then crop back at a random offset

Order: crop, flip, then translate/rotate/zoom as one affine resampling
(bilinear, about the image centre), then noise. Random numbers are drawn from
`generator` on its own device and moved to x's device, so a CPU generator gives
the same draws whatever device x is on.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

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


def check_augment(config) -> dict:
    """Validate an augmentation config; return it normalized (only active keys, fill set)."""
    if config is None:
        return {}
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
        if not isinstance(f, bool):
            raise AugmentError(f"augment 'flip' must be true or false, got {f!r}")
        if f:
            out["flip"] = True
    fill = config.get("fill", "reflect")
    if fill not in FILLS:
        raise AugmentError(f"augment 'fill' must be one of {', '.join(FILLS)}, got {fill!r}")
    if "fill" in config or any(k in out for k in ("translate", "rotate", "zoom", "crop")):
        out["fill"] = fill
    return out


def _draw(fn, n, generator, device=None, **kw):
    """fn(*n) drawn on the generator's device, then moved to device (if given)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    out = fn(*n, generator=generator, device=gdev, **kw)
    return out if device is None else out.to(device)


def _crop(x, pad, fill, generator):
    n, c, h, w = x.shape
    if fill == "reflect" and (pad >= h or pad >= w):
        raise AugmentError(f"augment 'crop' {pad} with fill 'reflect' needs images larger than "
                           f"{pad} pixels, got {h}x{w}")
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if fill == "reflect" else "constant")
    oy = _draw(torch.randint, (0, 2 * pad + 1, (n,)), generator, x.device)
    ox = _draw(torch.randint, (0, 2 * pad + 1, (n,)), generator, x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


def _flip(x, generator):
    mask = _draw(torch.rand, ((x.shape[0],),), generator, x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def _affine(x, cfg, generator):
    """Per image: out = s * R(angle) * in + t about the centre, as one grid_sample."""
    n, _, h, w = x.shape

    def uniform(scale):  # U[-scale, scale], (n,), float64 on the generator's device
        return (_draw(torch.rand, ((n,),), generator, dtype=torch.float64) * 2 - 1) * scale

    gdev = generator.device if generator is not None else torch.device("cpu")
    zero = torch.zeros(n, dtype=torch.float64, device=gdev)
    angle = uniform(math.radians(cfg["rotate"])) if "rotate" in cfg else zero
    scale = 1 + uniform(cfg["zoom"]) if "zoom" in cfg else zero + 1
    t = cfg.get("translate")
    if t is None:
        tx = ty = zero
    elif isinstance(t, int):  # whole pixels
        tx = _draw(torch.randint, (-t, t + 1, (n,)), generator).double()
        ty = _draw(torch.randint, (-t, t + 1, (n,)), generator).double()
    else:
        tx, ty = uniform(t * w), uniform(t * h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # inverse map in normalized coords (align_corners=False): in = A @ out + b
    theta = torch.stack([
        torch.stack([cos, sin * h / w, -(cos * tx + sin * ty) * 2 / w], 1),
        torch.stack([-sin * w / h, cos, -(-sin * tx + cos * ty) * 2 / h], 1),
    ], 1).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    pad = "reflection" if cfg.get("fill", "reflect") == "reflect" else "zeros"
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=pad, align_corners=False)


def augment(x: torch.Tensor, config: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly transform a float (N, C, H, W) batch; same shape, dtype, device and memory format."""
    cfg = check_augment(config)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise AugmentError("augment expects a float tensor of shape (N, C, H, W)")
    if not any(k in cfg for k in ("crop", "flip", "translate", "rotate", "zoom", "noise")) or x.shape[0] == 0:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dtype = x.dtype
    out = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if "crop" in cfg:
        out = _crop(out, cfg["crop"], cfg["fill"], generator)
    if cfg.get("flip"):
        out = _flip(out, generator)
    if any(k in cfg for k in ("translate", "rotate", "zoom")):
        out = _affine(out, cfg, generator)
    if "noise" in cfg:
        noise = _draw(torch.randn, (tuple(out.shape),), generator, out.device, dtype=torch.float32)
        out = out + noise.to(out.dtype) * cfg["noise"]
    out = out.to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out

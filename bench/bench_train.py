"""Training throughput: cnnlab's training loop against a plain PyTorch loop (and Keras 3).

Same network, optimizer, batch size and data for each (Adam 1e-3, or with --recipes the
zoo recipe's options); images/s over timed steps after a warm-up. Data are random uint8 images (throughput does not
depend on content). Run alone: two benchmarks at once on 2 cores halve both.

    python bench/bench_train.py                 # cifar-basic and cifar-bn, fp32
    python bench/bench_train.py --precisions fp32,bf16
    python bench/bench_train.py --keras-python /tmp/keras-env/bin/python
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

from cnnlab import zoo  # noqa: E402
from cnnlab.training import fit  # noqa: E402


class Mul(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def plain_net(name):
    """The zoo networks written directly in PyTorch (NCHW)."""
    if name == "cifar-basic":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.25), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(1600, 256), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(256, 10))
    if name == "cifar-bn":
        layers, c = [], 3
        for f in (32, 64, 128):
            layers += [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(f, eps=1e-3, momentum=0.01),
                       nn.Conv2d(f, f, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(f, eps=1e-3, momentum=0.01),
                       nn.MaxPool2d(2)]
            c = f
        return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.2), nn.Linear(2048, 1024),
                             nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 10))
    if name == "airbench":
        def bn(c):   # BatchNorm with gamma frozen at 1
            m = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
            m.weight.requires_grad_(False)
            return m
        layers, c = [nn.Conv2d(3, 24, 2, bias=False), nn.GELU()], 24
        for w in (64, 256, 256):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.MaxPool2d(2), bn(w), nn.GELU(),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), bn(w), nn.GELU()]
            c = w
        net = nn.Sequential(*layers, nn.MaxPool2d(3), nn.Flatten(), nn.Linear(c, 10, bias=False),
                            Mul(1 / 9))
        net[0].weight.requires_grad_(False)
        return net
    raise ValueError(name)


def recipe_of(name, use_recipe):
    """The settings both loops use: the zoo recipe's (with --recipes), else plain Adam 1e-3."""
    if not use_recipe:
        return {"optimizer": "adam", "lr": 1e-3}
    return {k: v for k, v in zoo.recipe(name).items() if k not in ("description", "data")}


def plain_optimizer(net, r):
    name, lr = r.get("optimizer", "adam"), r.get("lr", 1e-3)
    if name in ("adam", "adamw"):
        make = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        wd = r.get("weight_decay")
        return make(net.parameters(), lr, weight_decay=(0.01 if name == "adamw" else 0.0)
                    if wd is None else wd)
    if name != "sgd":
        raise SystemExit(f"the plain loop has no {name} optimizer")
    if not r.get("decoupled"):
        return torch.optim.SGD(net.parameters(), lr, momentum=r.get("momentum", 0.0),
                               nesterov=r.get("nesterov", False),
                               weight_decay=r.get("weight_decay") or 0.0)
    # SGD with airbench's decoupled lr and decay, BatchNorm biases apart (lr x bias_lr)
    k = 1024 * (1 + 1 / (1 - r["momentum"]))
    lr, wd = r["lr"] / k, r["weight_decay"] * r["batch_size"] / k
    norm = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
            if p.requires_grad]
    ids = {id(p) for p in norm}
    other = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
    blr = lr * r.get("bias_lr", 1.0)
    groups = [{"params": other, "lr": lr, "weight_decay": wd / lr, "base": lr},
              {"params": norm, "lr": blr, "weight_decay": wd / blr, "base": blr}]
    return torch.optim.SGD(groups, momentum=r["momentum"], nesterov=True)


def plain_augment(xb, aug, step, idx, gen):
    """Reflect-pad crop and (alternating or random) flip, or a random translation."""
    n, c, h, w = xb.shape
    if aug.get("flip") == "alternate":
        mask = (torch.from_numpy(idx.copy()) % 2 == 1) ^ bool(step % 2)
        xb = torch.where(mask[:, None, None, None], xb.flip(3), xb)
    elif aug.get("flip"):
        xb = torch.where(torch.rand(n, generator=gen)[:, None, None, None] < 0.5, xb.flip(3), xb)
    if aug.get("crop"):
        p = aug["crop"]
        padded = F.pad(xb, (p, p, p, p), mode="reflect")
        oy, ox = torch.randint(0, 2 * p + 1, (2, n), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        xb = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                    rows, cols]
    if aug.get("translate"):
        t = (torch.rand(n, 2, generator=gen) * 2 - 1) * aug["translate"] * 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = t
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        xb = F.grid_sample(xb, grid, align_corners=False)
    return xb


def plain_loop(name, x, y, batch, precision, channels_last, warmup, r):
    """The loop a PyTorch user would write for the same net and settings."""
    net = plain_net(name)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    r = {**r, "batch_size": batch}
    opt = plain_optimizer(net, r)
    aug = r.get("augment") or {}
    if isinstance(aug, str):
        aug = {"flip": True, "translate": 0.1}
    ema = {k: v.clone() for k, v in net.state_dict().items()} if r.get("lookahead") else None
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    yt = torch.from_numpy(y)
    mean = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    steps = len(x) // batch
    reduction = r.get("loss_reduction", "mean")
    net.train()
    t0 = None
    for s in range(steps):
        if s == warmup:
            t0 = time.perf_counter()
        for g in opt.param_groups:   # a schedule's per-step lr (its shape does not matter here)
            if "base" in g:
                g["lr"] = g["base"] * (0.2 + 0.8 * s / steps)
        idx = perm[s * batch:(s + 1) * batch]
        xb = (xt[idx].float() / 255 - mean) / std
        if aug:
            xb = plain_augment(xb, aug, s, idx.numpy(), gen)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(net(xb).float(), yt[idx], reduction=reduction,
                                   label_smoothing=r.get("label_smoothing", 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None and (s + 1) % 5 == 0:
            a = 0.95 ** 5 * ((s + 1) / steps) ** 3
            with torch.no_grad():
                for e, v in zip(ema.values(), net.state_dict().values()):
                    if v.is_floating_point():
                        e.lerp_(v, 1 - a)
                        v.copy_(e)
    return (steps - warmup) * batch / (time.perf_counter() - t0)


def cnnlab_loop(name, x, y, batch, precision, channels_last, warmup, r):
    # time an epoch of `warmup` steps, then a full one; the difference isolates steady state
    opts = {**r, "epochs": 1, "batch_size": batch, "precision": precision,
            "channels_last": channels_last, "verbose": 0}
    small = fit(zoo.build(name), (x[:warmup * batch], y[:warmup * batch]), **opts)
    full = fit(zoo.build(name), (x, y), **opts)
    steps = len(x) // batch
    return (steps - warmup) * batch / (full[0]["seconds"] - small[0]["seconds"])


def keras_loop(python, name, n, batch):
    code = Path(__file__).with_name("keras_train.py")
    out = subprocess.run([python, str(code), name, str(n), str(batch)], capture_output=True,
                         text=True, env={"KERAS_BACKEND": "torch", "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cifar-basic,cifar-bn")
    ap.add_argument("--steps", type=int, default=40, help="steps per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated: fp32,bf16 (bf16 is emulated and slow on CPUs "
                         "without native bf16)")
    ap.add_argument("--keras-python", help="a Python with keras installed (bench-only env)")
    ap.add_argument("--recipes", action="store_true",
                    help="each model's zoo recipe in both loops (optimizer, batch size, loss, "
                         "augmentation, lookahead); --batch is then the recipe's")
    ap.add_argument("--repeats", type=int, default=3,
                    help="Keras and cnnlab measured alternately this many times (medians)")
    ap.add_argument("--memory-formats", default="contiguous,channels_last")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    warmup = 5
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models.split(","):
        r = recipe_of(name, args.recipes)
        batch = r.get("batch_size", args.batch) if args.recipes else args.batch
        n = (args.steps + warmup) * batch
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.int64)
        for precision in args.precisions.split(","):
            for cl in [f == "channels_last" for f in args.memory_formats.split(",")]:
                torch.manual_seed(0)
                p = plain_loop(name, x, y, batch, precision, cl, warmup, r)
                c = cnnlab_loop(name, x, y, batch, precision, cl, warmup, r)
                rows.append((name, precision, "channels_last" if cl else "contiguous", p, c))
                print(f"{name:12s} {precision} {rows[-1][2]:13s} plain {p:7.1f} img/s  "
                      f"cnnlab {c:7.1f} img/s  ratio {c / p:.2f}", flush=True)
        if args.keras_python:   # Keras' defaults (fp32) against cnnlab's (precision auto)
            ks, cs = [], []   # alternated, medians: a VM's speed drifts within minutes
            for _ in range(args.repeats):
                k = keras_loop(args.keras_python, name, n, batch)
                if k is None:
                    break
                ks.append(k)
                cs.append(cnnlab_loop(name, x, y, batch, "auto", True, warmup, r))
            if ks:
                k, c = float(np.median(ks)), float(np.median(cs))
                rows.append((name, "keras", "fp32", k, c))
                print(f"{name:12s} keras 3 (torch backend) {k:7.1f} img/s; cnnlab defaults "
                      f"{c:.1f} -> {c / k:.2f}x (medians of {len(ks)})", flush=True)
    if args.no_write:
        return
    from bench_time_to_accuracy import cpu_line
    what = ("each model's zoo recipe (optimizer, batch, loss, augmentation, lookahead) in both "
            "loops" if args.recipes else f"batch {args.batch}, Adam 1e-3, no augmentation")
    body = [f"Images per second; {what}; {args.steps} timed steps after {warmup} warm-up steps; "
            f"random 32x32x3 data. {cpu_line()}. Keras 3 runs its defaults (fp32), cnnlab its "
            f"own (`--precision auto`, channels_last). Keras rows: Keras and cnnlab measured "
            f"alternately (up to {args.repeats} times), medians; other rows: one measurement "
            f"each.", "",
            "| model | precision | memory format | plain PyTorch | cnnlab | ratio |",
            "| --- | --- | --- | ---: | ---: | ---: |"]
    for name, prec, fmt, p, c in rows:
        if prec == "keras":
            body.append(f"| {name} | Keras 3, torch backend | fp32 | {p:.1f} (Keras) | {c:.1f} "
                        f"(cnnlab defaults) | {c / p:.2f}x |")
        else:
            body.append(f"| {name} | {prec} | {fmt} | {p:.1f} | {c:.1f} | {c / p:.2f} |")
    flags = " ".join(a for a in sys.argv[1:])
    body.append(f"\nReproduce: `.venv/bin/python bench/bench_train.py {flags}`")
    write_section("Training throughput, recipes (PyTorch engine)" if args.recipes
                  else "Training throughput (PyTorch engine)", "\n".join(body))


if __name__ == "__main__":
    main()

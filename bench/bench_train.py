"""Training throughput: cnnlab's training loop against a plain PyTorch loop (and Keras 3).

Same network, optimizer (Adam 1e-3), batch size and data for each; images/s over
timed steps after a warm-up. Data are random uint8 images (throughput does not
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
    raise ValueError(name)


def plain_loop(name, x, y, batch, precision, channels_last, warmup):
    net = plain_net(name)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    yt = torch.from_numpy(y)
    perm = torch.randperm(len(x))
    steps = len(x) // batch
    net.train()
    t0 = None
    for s in range(steps):
        if s == warmup:
            t0 = time.perf_counter()
        idx = perm[s * batch:(s + 1) * batch]
        xb = xt[idx].float() / 255
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(net(xb).float(), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (steps - warmup) * batch / (time.perf_counter() - t0)


def cnnlab_loop(name, x, y, batch, precision, channels_last, warmup):
    model = zoo.build(name)
    # time an epoch of `warmup` steps, then a full one; the difference isolates steady state
    small = fit(model, (x[:warmup * batch], y[:warmup * batch]), epochs=1, batch_size=batch,
                precision=precision, channels_last=channels_last, verbose=0)
    full = fit(model, (x, y), epochs=1, batch_size=batch, precision=precision,
               channels_last=channels_last, verbose=0)
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
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    warmup = 5
    n = (args.steps + warmup) * args.batch
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            for cl in (False, True):
                torch.manual_seed(0)
                p = plain_loop(name, x, y, args.batch, precision, cl, warmup)
                c = cnnlab_loop(name, x, y, args.batch, precision, cl, warmup)
                rows.append((name, precision, "channels_last" if cl else "contiguous", p, c))
                print(f"{name:12s} {precision} {rows[-1][2]:13s} plain {p:7.1f} img/s  "
                      f"cnnlab {c:7.1f} img/s  ratio {c / p:.2f}", flush=True)
        if args.keras_python:
            k = keras_loop(args.keras_python, name, n, args.batch)
            if k:
                best = max(r[4] for r in rows if r[0] == name)
                rows.append((name, "keras", "fp32", k, best))
                print(f"{name:12s} keras 3 (torch backend) {k:7.1f} img/s; cnnlab best "
                      f"{best:.1f} -> {best / k:.2f}x", flush=True)
    if args.no_write:
        return
    body = ["Images per second, batch {}, Adam, {} timed steps after {} warm-up steps; "
            "random 32x32x3 data.".format(args.batch, args.steps, warmup), "",
            "| model | precision | memory format | plain PyTorch | cnnlab | ratio |",
            "| --- | --- | --- | ---: | ---: | ---: |"]
    for name, prec, fmt, p, c in rows:
        if prec == "keras":
            body.append(f"| {name} | Keras 3, torch backend | fp32 | {p:.1f} (Keras) | {c:.1f} "
                        f"(cnnlab default) | {c / p:.2f}x |")
        else:
            body.append(f"| {name} | {prec} | {fmt} | {p:.1f} | {c:.1f} | {c / p:.2f} |")
    body.append("\nReproduce: `.venv/bin/python bench/bench_train.py`")
    write_section("Training throughput (PyTorch engine)", "\n".join(body))


if __name__ == "__main__":
    main()

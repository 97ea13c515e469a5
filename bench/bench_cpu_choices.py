"""CPU choices for fast training, measured one at a time on the airbench network (or another
zoo model): batch size, memory format, threads and precision for training; eager against
torch.compile for evaluation and test-time augmentation. Random uint8 data (speed does not
depend on content); each bf16 figure is the best of 2 timings after warm-up steps, each
fp32 one (4-8x slower) a single timing of 2 steps.

    python bench/bench_cpu_choices.py                   # airbench, writes RESULTS.md
    python bench/bench_cpu_choices.py --model cifar-basic --no-compile
    python bench/bench_cpu_choices.py --dropout          # cnnlab's dropout against F.dropout
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from results import write_section  # noqa: E402
from bench_time_to_accuracy import cpu_line, loop_backend  # noqa: E402

from cnnlab import zoo  # noqa: E402
from cnnlab.engines.torch.engine import TorchNet, load_weights  # noqa: E402


def train_speed(name, batch, precision, channels_last, threads, steps, warmup=2, repeats=2):
    """Training images/s of the cnnlab loop's step with the recipe's other options."""
    torch.set_num_threads(threads)
    be = loop_backend(name, batch, steps + warmup, precision=precision,
                      channels_last=channels_last)
    best = 0.0
    for _ in range(repeats):
        for s in range(warmup):
            be.train_step(np.arange(s * batch, (s + 1) * batch), s)
        be.collect()
        t = time.perf_counter()
        for s in range(warmup, warmup + steps):
            be.train_step(np.arange(s * batch, (s + 1) * batch), s)
        be.collect()
        best = max(best, batch * steps / (time.perf_counter() - t))
    return best


def six_views(x):
    """The views of TTA level 2: the image, the two diagonal 1-pixel shifts, and mirrors."""
    h, w = x.shape[2:]
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, p[:, :, :h, :w], p[:, :, 2:, 2:]]
    return views + [v.flip(3) for v in views]


def eval_speed(name, compiled, threads, n=2000, batch=500, tta=False):
    """Inference images/s in bf16 autocast (channels_last), eager or torch.compile'd;
    with tta, the six views of TTA level 2 count as one image. Returns (images/s,
    seconds spent before the first timed pass, compilation included)."""
    torch.set_num_threads(threads)
    model = zoo.build(name)
    model.init_weights(0)
    net = TorchNet(model)
    load_weights(net, model)
    net = net.to(memory_format=torch.channels_last).eval()
    fn = torch.compile(net, dynamic=False) if compiled else net
    x = torch.randn(n, *(model.input_shape[2], *model.input_shape[:2])).contiguous(
        memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, n, batch):
                xb = x[i:i + batch]
                for v in (six_views(xb) if tta else [xb]):
                    fn(v.contiguous(memory_format=torch.channels_last))
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    t = time.perf_counter()
    run()
    return n / (time.perf_counter() - t), first


def dropout_layer_ms(fn, shape, dtype, rate=0.25, reps=40):
    """Milliseconds for one dropout layer's forward and backward on a (channels_last)
    activation of `shape`."""
    x = torch.randn(shape).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def once():
        y = fn(x, rate)
        y.backward(torch.ones_like(y))
    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t) / reps * 1e3


def dropout_rows(threads=2, batch=128, steps=15, alternations=4):
    """cnnlab's CPU dropout (a mask from float32 uniforms) against F.dropout (bernoulli_):
    one layer at cifar-basic's first dropout shape, then whole cifar-basic training steps
    with either in the engine, alternated, medians."""
    import torch.nn.functional as F
    from cnnlab import layers as L
    from cnnlab.engines.torch import engine as E
    torch.set_num_threads(threads)
    ours = E.Dropout(L.Dropout(0.25), (14, 14, 32), (14, 14, 32))

    def cnnlab_dropout(x, rate):
        with E._call(training=True):
            return ours(x)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        for label, fn in (("F.dropout", lambda x, r: F.dropout(x, r, True)),
                          ("cnnlab", cnnlab_dropout)):
            rows.append(("one layer (128, 32, 14, 14), forward + backward", f"{label}, {name}",
                         dropout_layer_ms(fn, (batch, 32, 14, 14), dtype), "ms"))
    new = E.Dropout.transform

    def old(self, x):
        return F.dropout(x, self.layer.rate, E._training(self))
    for precision in ("bf16", "fp32"):
        be = loop_backend("cifar-basic", batch, 16, precision=precision)
        speeds = {"F.dropout": [], "cnnlab": []}
        for _ in range(alternations):
            for label, transform in (("F.dropout", old), ("cnnlab", new)):
                E.Dropout.transform = transform
                be.train_step(np.arange(batch), 0)
                be.collect()
                t = time.perf_counter()
                for s in range(steps):
                    be.train_step(np.arange((s % 16) * batch, (s % 16 + 1) * batch), s)
                be.collect()
                speeds[label].append(batch * steps / (time.perf_counter() - t))
        E.Dropout.transform = new
        for label, v in speeds.items():
            rows.append((f"cifar-basic training step, batch {batch}", f"{label}, {precision}",
                         float(np.median(v)), f"images/s (median of {alternations})"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batches", default="256,512,1024")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--dropout", action="store_true",
                    help="only: cnnlab's CPU dropout against F.dropout")
    args = ap.parse_args()
    name, rows = args.model, []
    if args.dropout:
        rows = dropout_rows()
        for w, st, v, u in rows:
            print(f"{w:48s} {st:20s} {v:9.2f} {u}", flush=True)
        if not args.no_write:
            body = [f"A dropout mask from float32 uniforms (`rand_like(x) >= rate`, what the "
                    f"torch engine does on a CPU) against F.dropout (`bernoulli_`). "
                    f"{cpu_line()}; 2 threads.", "",
                    "| what | dropout, precision | figure | unit |", "| --- | --- | ---: | --- |"]
            body += [f"| {w} | {st} | {v:.2f} | {u} |" if u == "ms" else
                     f"| {w} | {st} | {v:.0f} | {u} |" for w, st, v, u in rows]
            body.append("\nReproduce: `.venv/bin/python bench/bench_cpu_choices.py --dropout`")
            write_section("Dropout on a CPU", "\n".join(body))
        return

    def add(what, setting, value, unit="training images/s"):
        rows.append((what, setting, value, unit))
        print(f"{what:28s} {setting:44s} {value:8.1f} {unit}", flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    for b in batches:
        add("batch size", f"{b}, bf16, channels_last, 2 threads",
            train_speed(name, b, "bf16", True, 2, args.steps))
    big = batches[-1]
    add("memory format", f"{big}, bf16, contiguous (NCHW), 2 threads",
        train_speed(name, big, "bf16", False, 2, args.steps))
    add("threads", f"{big}, bf16, channels_last, 1 thread",
        train_speed(name, big, "bf16", True, 1, args.steps))
    small = batches[0]
    for cl in (True, False):
        add("precision", f"{small}, fp32, {'channels_last' if cl else 'contiguous (NCHW)'}, "
                         f"2 threads", train_speed(name, small, "fp32", cl, 2, 2, warmup=1,
                                                   repeats=1))
    add("precision", f"{small}, bf16, channels_last, 2 threads",
        train_speed(name, small, "bf16", True, 2, args.steps))
    for tta in (False, True):
        what = "TTA level 2 (6 views)" if tta else "evaluation"
        ips, first = eval_speed(name, False, 2, tta=tta)
        add(what, "eager, bf16", ips, "test images/s")
        if not args.no_compile:
            ips_c, first_c = eval_speed(name, True, 2, tta=tta)
            add(what, f"torch.compile, bf16 (first pass {first_c:.0f} s vs {first:.1f} s)",
                ips_c, "test images/s")
    if args.no_write:
        return
    body = [f"`{name}` with its recipe's options; random data; best of 2 timings after warm-up "
            f"steps (fp32: one timing). {cpu_line()}.", "",
            "| choice | setting | figure | unit |", "| --- | --- | ---: | --- |"]
    body += [f"| {w} | {s} | {v:.0f} | {u} |" for w, s, v, u in rows]
    body.append(f"\nReproduce: `.venv/bin/python bench/bench_cpu_choices.py --model {name}`")
    write_section(f"CPU choices ({name})", "\n".join(body))


if __name__ == "__main__":
    main()

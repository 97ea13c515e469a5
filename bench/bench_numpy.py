"""The NumPy engine against PyTorch on CPU: per-layer times, an MNIST epoch, latency.

    python bench/bench_numpy.py            # everything (full MNIST from ../shared/datasets)
    python bench/bench_numpy.py --quick    # fewer repetitions, no full epoch

Both engines get the same thread count (--threads, default 1, set before numpy loads, and
with threadpoolctl where it is installed). Each layer's four timings are interleaved
(NumPy forward, torch forward, NumPy forward+backward, torch forward+backward, again and
again; the best of --reps rounds each), so that a busy machine slows both sides alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--quick", action="store_true")
ap.add_argument("--data-dir", default=os.environ.get("CNNLAB_SHARED_DATASETS") or str(
    Path(__file__).resolve().parents[2] / "shared" / "datasets"))
ap.add_argument("--no-write", action="store_true")
args = ap.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

from cnnlab import zoo  # noqa: E402
from cnnlab.engines.numpy import ops  # noqa: E402
from cnnlab.engines.numpy.engine import NumpyEngine  # noqa: E402
from cnnlab.layers import Conv2D  # noqa: E402

torch.set_num_threads(args.threads)
REPS = 3 if args.quick else args.reps


def best_interleaved(fns, reps=REPS):
    """The best time in ms of each function, run in turn: fns[0], fns[1], ..., fns[0], ..."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1000 * min(t) for t in times]


def blas_and_flags():
    """NumPy's BLAS (library, kernel, threads) and the CPU's vector extensions."""
    try:
        from threadpoolctl import threadpool_info
        blas = [f"{i['internal_api']} {i.get('version') or ''} {i.get('architecture') or ''} "
                f"kernel, {i['num_threads']} thread(s)" for i in threadpool_info()
                if i["user_api"] == "blas" and "numpy" in i["filepath"]]
    except ImportError:
        blas = []
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    vec = [f for f in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                       "amx_tile") if f in flags]
    core = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return (f"NumPy BLAS: {'; '.join(blas) or 'unknown (no threadpoolctl)'}"
            f"{f' ({core})' if core else ''}. CPU flags: {' '.join(vec) or 'none of avx/avx2/avx512'}.")


def conv_layers():
    """(model, layer, input shape) for every Conv2D of lenet, cifar-basic and cifar-bn."""
    for name in ("lenet", "cifar-basic", "cifar-bn"):
        m = zoo.build(name)
        for layer, (i, _) in zip(m.layers, m.layer_shapes):
            if isinstance(layer, Conv2D):
                yield name, layer, i


def per_layer(batch=128):
    rows = []
    rng = np.random.default_rng(0)
    for name, layer, (h, w, c) in conv_layers():
        x = rng.standard_normal((batch, h, w, c), dtype=np.float32)
        k = rng.standard_normal((*layer.kernel_size, c, layer.filters), dtype=np.float32) * 0.1
        b = np.zeros(layer.filters, np.float32)
        out, _ = ops.conv2d_forward(x, k, b, layer.strides, layer.padding)
        dout = rng.standard_normal(out.shape, dtype=np.float32)
        (pt, pb), (pl, pr) = layer.pads((h, w, c))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        xt.requires_grad_(True)
        kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        bt = torch.from_numpy(b).requires_grad_(True)
        dt = torch.from_numpy(dout).permute(0, 3, 1, 2)

        def tf():
            with torch.no_grad():
                return F.conv2d(F.pad(xt, (pl, pr, pt, pb)), kt, bt, layer.strides)

        def tfb():
            y = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), kt, bt, layer.strides)
            y.backward(dt)
        np_f, t_f, np_fb, t_fb = best_interleaved([
            lambda: ops.conv2d_forward(x, k, b, layer.strides, layer.padding), tf,
            lambda: ops.conv2d_backward(
                dout, ops.conv2d_forward(x, k, b, layer.strides, layer.padding)[1]), tfb])
        rows.append((name, layer.name, f"{c}->{layer.filters} {h}x{w} k{layer.kernel_size[0]} "
                     f"{layer.padding}", np_f, t_f, np_fb, t_fb))
        print(f"{rows[-1][0]:12s} {rows[-1][1]:10s} {rows[-1][2]:22s} fwd {np_f:7.1f} / {t_f:6.1f} ms "
              f"({np_f / t_f:4.2f}x)  fwd+bwd {np_fb:7.1f} / {t_fb:6.1f} ms ({np_fb / t_fb:4.2f}x)",
              flush=True)
    return rows


def mnist_epoch():
    from cnnlab import datasets
    from cnnlab.training import fit
    try:
        ds = datasets.load("mnist", data_dir=args.data_dir, download=False, progress=False)
    except datasets.DatasetError as e:
        print(f"skipping the MNIST epoch: {e}")
        return None
    out = {}
    for engine in ("numpy", "torch"):
        model = zoo.build("lenet")
        h = fit(model, ds, epochs=1, batch_size=32, lr=3e-3, engine=engine, verbose=0)
        out[engine] = (h[0]["seconds"], h[0]["val_accuracy"])
        print(f"lenet, one epoch of full MNIST (60,000 images, batch 32), {engine}: "
              f"{h[0]['seconds']:.1f} s, val accuracy {h[0]['val_accuracy']:.4f}", flush=True)
    return out


def latency():
    rows = []
    for name in ("lenet", "litecnn"):
        m = zoo.build(name)
        eng = NumpyEngine(m)
        x = np.random.default_rng(0).random((1, 28, 28, 1), dtype=np.float32)
        for _ in range(20):
            eng.predict_proba(x)
        times = []
        for _ in range(200 if args.quick else 1000):
            t0 = time.perf_counter()
            eng.predict_proba(x)
            times.append(1000 * (time.perf_counter() - t0))
        p50, p99 = np.percentile(times, [50, 99])
        rows.append((name, p50, p99))
        print(f"{name}: one 28x28 image, NumPy engine: p50 {p50:.2f} ms, p99 {p99:.2f} ms",
              flush=True)
    return rows


try:
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
except ImportError:
    pass
print(blas_and_flags(), flush=True)
load_before = os.getloadavg()[0]
layers = per_layer()
load_after = os.getloadavg()[0]
lat = latency()
epoch = None if args.quick else mnist_epoch()
if not args.no_write:
    body = [f"Conv2D layers at batch 128, float32, {args.threads} thread(s) for both; best of "
            f"{REPS} interleaved rounds. Ratio = NumPy / PyTorch (lower is better; goal <= 2 "
            "for 3x3 stride 1). " + blas_and_flags(),
            f"Load average (1 min) {load_before:.1f} before and {load_after:.1f} after the layer "
            f"timings on {os.cpu_count()} cores: the machine was shared with other work. "
            "NumPy and torch are timed in turn, so both see the same load.", "",
            "| model | layer | shape | NumPy fwd ms | torch fwd ms | ratio | NumPy fwd+bwd ms | "
            "torch fwd+bwd ms | ratio |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, lname, shape, nf, tf, nfb, tfb in layers:
        body.append(f"| {name} | {lname} | {shape} | {nf:.1f} | {tf:.1f} | {nf / tf:.2f} | "
                    f"{nfb:.1f} | {tfb:.1f} | {nfb / tfb:.2f} |")
    body += ["", "Inference latency, one 28x28 image, NumPy engine:", "",
             "| model | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
    body += [f"| {n} | {a:.2f} | {b:.2f} |" for n, a, b in lat]
    if epoch:
        body += ["", "One epoch of `lenet` on full MNIST (60,000 images, batch 32, Adam):", "",
                 "| engine | seconds | val accuracy after 1 epoch |", "| --- | ---: | ---: |"]
        body += [f"| {e} | {s:.1f} | {a:.4f} |" for e, (s, a) in epoch.items()]
    body.append(f"\nReproduce: `.venv/bin/python bench/bench_numpy.py --threads {args.threads}`")
    write_section(f"NumPy engine vs PyTorch ({args.threads} thread)", "\n".join(body))

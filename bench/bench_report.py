"""Time `cnnlab report` end to end: lenet on full MNIST, cifar-basic on CIFAR-10.

    python bench/bench_report.py                                  # trains quick models first
    python bench/bench_report.py --lenet runs/lenet --cifar runs/cifar --engine numpy
    python bench/bench_report.py --skip-cifar --no-write

Without a model path, the model is trained for 1 epoch on the first --train-images
training images (the report's cost does not depend on how well it is trained). The
report always covers the whole test split (10,000 images for both). Prints the
timings and replaces the "Report timings" section of bench/RESULTS.md (other sections
are kept).
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from results import SHARED_DATASETS, machine  # noqa: E402

from cnnlab import datasets, zoo  # noqa: E402
from cnnlab import load  # noqa: E402
from cnnlab.inspect import write_report  # noqa: E402

SECTION = "## Report timings"


class Tee(io.StringIO):
    """Keeps the progress lines and shows them as they come."""

    def write(self, s):
        sys.stderr.write(s)
        return super().write(s)


def quick_model(name, data, data_dir, n_train, work):
    ds = datasets.load(data, data_dir=data_dir)
    small = datasets.Dataset(ds.name, ds.x_train[:n_train], ds.y_train[:n_train],
                             ds.x_test[:1000], ds.y_test[:1000], ds.class_names, ds.source)
    model = zoo.build(name, input_shape=ds.input_shape, num_classes=ds.num_classes)
    recipe = {k: v for k, v in zoo.recipe(name).items()
              if k in ("optimizer", "lr", "batch_size", "standardize")}
    out = Path(work) / name
    t = time.perf_counter()
    model.fit(small, epochs=1, verbose=0, out=str(out), data_dir=data_dir, **recipe)
    print(f"trained {name} for 1 epoch on {n_train:,} images in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def bench(label, model_path, data, data_dir, engine, work, source):
    print(f"\n{label}: report on {data}", file=sys.stderr)
    log = Tee()
    t = time.perf_counter()
    path = write_report(model_path, data, Path(work) / f"report-{label}", engine=engine,
                        data_dir=data_dir, progress=log)
    total = time.perf_counter() - t
    steps = [(m[1], float(m[2]))
             for m in re.finditer(r"\] (.+?) \.\.\. ([\d.]+) s", log.getvalue())]
    model = load(model_path)
    n_test = re.search(r"predicting ([\d,]+) test images \((\w+) engine\)", log.getvalue())
    print(f"{label}: {total:.1f} s -> {path}", file=sys.stderr)
    return {"label": label, "model": model.name, "data": data, "images": n_test[1],
            "source": source,
            "engine": n_test[2], "total": total, "steps": steps,
            "figures": len(list(path.parent.glob("*.png")))}


def markdown(results) -> str:
    lines = [SECTION, "",
             f"`python {' '.join(['bench/bench_report.py', *sys.argv[1:]])}` on "
             f"{datetime.now():%Y-%m-%d %H:%M}, {machine()}.",
             "Models: " + "; ".join(f"{r['model']} {r['source']}" for r in results) + ".",
             "Full report (all figures, PNG + HTML) over the whole test split; default options "
             "(16 images, occlusion patch 4 stride 2, 128 maximization steps, 16 filters per "
             "layer).", "",
             "| model | data | test images | engine | figures | total (s) | slowest steps (s) |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in results:
        slow = ", ".join(f"{name} {sec:.1f}" for name, sec in
                         sorted(r["steps"], key=lambda s: -s[1])[:3])
        lines.append(f"| {r['model']} | {r['data']} | {r['images']} | {r['engine']} | "
                     f"{r['figures']} | {r['total']:.1f} | {slow} |")
    return "\n".join(lines) + "\n"


def update_results(text: str, path: Path):
    """Replace the section (up to the next '## ' heading) or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def _source(path, n_train):
    return f"from {path}" if path else f"trained 1 epoch on {n_train:,} images"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lenet", help="a lenet model file or run dir trained on mnist")
    p.add_argument("--cifar", help="a cifar-basic model file or run dir trained on cifar10")
    p.add_argument("--data-dir", default=SHARED_DATASETS)
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "numpy"])
    p.add_argument("--train-images", type=int, default=10000,
                   help="images for the 1-epoch quick models (default 10000)")
    p.add_argument("--skip-cifar", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-report-") as work:
        lenet = args.lenet or quick_model("lenet", "mnist", args.data_dir, args.train_images,
                                          work)
        results.append(bench("lenet", lenet, "mnist", args.data_dir, args.engine, work,
                             _source(args.lenet, args.train_images)))
        if not args.skip_cifar:
            cifar = args.cifar or quick_model("cifar-basic", "cifar10", args.data_dir,
                                              args.train_images, work)
            results.append(bench("cifar-basic", cifar, "cifar10", args.data_dir, args.engine,
                                 work, _source(args.cifar, args.train_images)))
    text = markdown(results)
    print("\n" + text)
    if not args.no_write:
        update_results(text, ROOT / "bench" / "RESULTS.md")
        print(f"updated {ROOT / 'bench' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

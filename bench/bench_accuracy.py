"""Accuracy runs with wall time on the full datasets (../shared/datasets), using each zoo
model's recipe. Results accumulate in bench/accuracy.json and the table in RESULTS.md.

    python bench/bench_accuracy.py lenet:mnist cifar-basic:cifar10 cifar-improved:cifar10
    python bench/bench_accuracy.py cifar-basic:cifar10 --precision bf16 --epochs 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from results import SHARED_DATASETS, machine, write_section  # noqa: E402

from cnnlab import datasets, zoo  # noqa: E402
from cnnlab.training import fit  # noqa: E402

STORE = HERE / "accuracy.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="MODEL:DATASET")
    ap.add_argument("--data-dir", default=SHARED_DATASETS)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs")
    ap.add_argument("--engine", default="torch", choices=["torch", "numpy"])
    args = ap.parse_args()
    store = json.loads(STORE.read_text()) if STORE.exists() else []
    for run in args.runs:
        name, data = run.split(":")
        ds = datasets.load(data, data_dir=args.data_dir, download=False)
        recipe = {k: v for k, v in zoo.recipe(name).items() if k not in ("description", "data")}
        if args.epochs:
            recipe["epochs"] = args.epochs
        model = zoo.build(name, input_shape=ds.input_shape, num_classes=ds.num_classes)
        t0 = time.perf_counter()
        hist = fit(model, ds, precision=args.precision, engine=args.engine, verbose=2, **recipe)
        wall = time.perf_counter() - t0
        acc = model.meta["training"]["test_accuracy"]
        row = {"model": name, "data": data, "epochs": len(hist), "precision": args.precision,
               "engine": args.engine, "test_accuracy": acc, "best_val_accuracy":
               max(h["val_accuracy"] for h in hist), "wall_s": round(wall, 1),
               "recipe": {k: v for k, v in recipe.items()}, "machine": machine(),
               "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        store = [r for r in store if (r["model"], r["data"], r["precision"], r["engine"],
                                      r["epochs"]) != (name, data, args.precision, args.engine,
                                                       len(hist))] + [row]
        STORE.write_text(json.dumps(store, indent=1) + "\n")
    body = ["Test accuracy after the recipe's epochs (validation on the test split, as the "
            "tutorials do), wall time including data loading and evaluation.", "",
            "| model | data | engine | precision | epochs | test accuracy | wall time | date |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in store:
        body.append(f"| {r['model']} | {r['data']} | {r['engine']} | {r['precision']} | "
                    f"{r['epochs']} | {r['test_accuracy']:.4f} | {r['wall_s'] / 60:.1f} min | "
                    f"{r['date']} |")
    body.append("\nReproduce: `.venv/bin/python bench/bench_accuracy.py lenet:mnist "
                "cifar-basic:cifar10 cifar-improved:cifar10`")
    write_section("Accuracy runs", "\n".join(body))


if __name__ == "__main__":
    main()

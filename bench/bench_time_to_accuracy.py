"""Accuracy against wall-clock time for each recipe: the curve a user waits through.

Each run trains a zoo model with its recipe on a real dataset (../shared/datasets) and
records, after every epoch, the test accuracy and the wall time since the start, which
includes loading the data, the initialisation (whitening) and every evaluation. The last
point adds test-time augmentation (--tta) to the final model. Runs accumulate in
bench/time_to_accuracy.json; the table goes to RESULTS.md and the curves to
bench/time_to_accuracy.png.

    python bench/bench_time_to_accuracy.py airbench:cifar10 --seeds 0,1,2
    python bench/bench_time_to_accuracy.py mnist-bn:fashion-mnist --tta 1 \
        --set 'augment={"crop": 2, "flip": true, "fill": "zero"}'
    python bench/bench_time_to_accuracy.py airbench:cifar10 --epochs 1 --note "smoke test"
    python bench/bench_time_to_accuracy.py --throughput airbench --precisions fp32,bf16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from results import SHARED_DATASETS, machine, write_section  # noqa: E402

from cnnlab import datasets, hardware, zoo  # noqa: E402
from cnnlab.evaluate import evaluate  # noqa: E402
from cnnlab.training import fit  # noqa: E402
from cnnlab.training import run as run_module  # noqa: E402

STORE = HERE / "time_to_accuracy.json"
FIGURE = HERE / "time_to_accuracy.png"
TITLE = "Time to accuracy (bench/bench_time_to_accuracy.py)"


def cpu_line() -> str:
    flags = hardware.cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    choice = hardware.choose_precision("cpu", flags)
    return (f"CPU {hardware.cpu_model()}; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}; "
            f"`--precision auto` picks {choice}")


def jpeg_again(x, quality, shift=4):
    """Every image through JPEG once more (Pillow, 4:2:0 chroma) on an 8x8 grid moved by
    `shift` pixels, so the new blocks do not line up with those of an earlier compression
    (re-encoding on the same grid at the same quality changes almost nothing)."""
    import io
    from PIL import Image
    out = np.empty_like(x)
    pad = ((shift, 8 - shift), (shift, 8 - shift), (0, 0))
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(np.pad(img, pad, mode="reflect").squeeze()).save(buf, "JPEG",
                                                                          quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("RGB" if img.shape[2] == 3 else "L"))
        out[i] = dec.reshape(dec.shape[0], dec.shape[1], -1)[shift:shift + img.shape[0],
                                                             shift:shift + img.shape[1]]
    return out


def time_run(model_name, data, args, seed):
    """One training run; returns its record with the (seconds, accuracy) curve."""
    t0 = time.perf_counter()
    ds = datasets.load(data, data_dir=args.data_dir, download=False)
    if args.jpeg:
        t1 = time.perf_counter()
        ds.x_train = jpeg_again(ds.x_train, args.jpeg)
        ds.x_test = jpeg_again(ds.x_test, args.jpeg)
        t0 += time.perf_counter() - t1   # an experiment's preparation, not the recipe's time
    recipe = {k: v for k, v in zoo.recipe(model_name).items() if k != "description"}
    recipe.update(seed=seed, verbose=args.verbose, data=data)
    for key in ("epochs", "precision", "batch_size", "engine"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    for item in args.set:   # KEY=JSON: any training option, e.g. augment={"crop": 2}
        key, _, value = item.partition("=")
        recipe[key] = json.loads(value)
    curve = []
    real_save = run_module.Run.save_epoch

    def record(run):   # after each epoch: wall time so far and the test accuracy
        h = run.trainer.history[-1]
        curve.append((round(time.perf_counter() - t0, 2), h.get("val_accuracy")))
        return real_save(run)
    run_module.Run.save_epoch = record
    try:
        model = zoo.build(model_name, input_shape=ds.input_shape, num_classes=ds.num_classes)
        hist = fit(model, ds, **recipe)
    finally:
        run_module.Run.save_epoch = real_save
    train_seconds = sum(h["seconds"] for h in hist)
    tta = None
    if args.tta:
        res = evaluate(model, ds, tta=args.tta, precision=recipe.get("precision", "auto"))
        tta = res["accuracy"]
        curve.append((round(time.perf_counter() - t0, 2), tta))
    fp32_eval = None
    if args.eval_fp32:   # the same weights evaluated in fp32 (not timed in the curve)
        fp32_eval = evaluate(model, ds, precision="fp32")["accuracy"]
        print(f"evaluated in fp32: {fp32_eval:.4f}")
    precision = recipe.get("precision", "auto")
    if precision == "auto":   # what it chose here
        import torch
        kind = "cuda" if torch.cuda.is_available() and recipe.get("device") != "cpu" else "cpu"
        precision = f"auto: {hardware.auto_precision(kind).precision}"
    return {"model": model_name, "data": data, "seed": seed, "epochs": len(hist),
            "classes": ds.num_classes, "precision": precision,
            "overrides": args.set, "jpeg": args.jpeg, "recipe": recipe,
            "batch_size": recipe["batch_size"],
            "train_images": int(len(ds.x_train)), "accuracy": hist[-1].get("val_accuracy"),
            "tta": args.tta, "tta_accuracy": tta, "fp32_eval_accuracy": fp32_eval, "wall_seconds": curve[-1][0],
            "epoch_images_per_s": round(len(ds.x_train) * len(hist) / train_seconds, 1),
            "curve": curve, "note": args.note, "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def loop_backend(model_name, batch, n_batches, **options):
    """The cnnlab loop's training backend for a zoo model with its recipe's options (and
    `options` over them), on n_batches batches of random uint8 images."""
    from cnnlab.training.config import TrainConfig
    from cnnlab.training.data import prepare_data
    from cnnlab.training.loop import Trainer
    model = zoo.build(model_name)
    rng = np.random.default_rng(0)
    n = batch * n_batches
    x = rng.integers(0, 256, (n, *model.input_shape), dtype=np.uint8)
    y = rng.integers(0, model.num_classes, n)
    recipe = {k: v for k, v in zoo.recipe(model_name).items() if k not in ("description",)}
    recipe.update(data="arrays", batch_size=batch, verbose=0, engine="torch", device="cpu",
                  **options)
    cfg = TrainConfig.from_dict(recipe).check()
    return Trainer(model, cfg, prepare_data((x, y), cfg, model.input_shape)).backend


def throughput(model_name, precision, batch, steps=6, warmup=2):
    """Training images/s of the cnnlab loop's step (random uint8 data, the recipe's options)."""
    be = loop_backend(model_name, batch, steps + warmup, precision=precision)
    times = []
    for s in range(steps + warmup):
        t = time.perf_counter()
        be.train_step(np.arange(s * batch, (s + 1) * batch), s)
        be.collect()      # waits for the step's results
        times.append(time.perf_counter() - t)
    return batch * steps / sum(times[warmup:]), be.device_info


def load_store():
    return json.loads(STORE.read_text()) if STORE.exists() else {"runs": [], "throughput": []}


def latest(runs):
    """The newest run without --set or --jpeg of each model, dataset, seed and CPU (its
    epochs, which --epochs may change, are in the label): recipes change, and the figure
    shows what the current ones do (the table keeps every run)."""
    newest = {}
    for r in runs:
        if r.get("overrides") or r.get("jpeg"):
            continue
        key = (r["model"], r["data"], r["seed"], cpu_of(r))
        if key not in newest or r["date"] >= newest[key]["date"]:
            newest[key] = r
    return sorted(newest.values(), key=lambda r: (r["data"], r["model"], r["seed"]))


def draw(runs):
    """Two panels: CIFAR-10 (0-100%), and the 28x28 datasets (zoomed to 85-100%)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("CIFAR-10", [r for r in runs if r["data"] == "cifar10"], (0, 100)),
              ("MNIST and Fashion-MNIST", [r for r in runs if r["data"] != "cifar10"], (85, 100))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), dpi=110)
    colors = plt.get_cmap("tab10").colors
    for ax, (title, group, ylim) in zip(axes, panels):
        for i, r in enumerate(group):   # from (0, chance): before the first epoch it guesses
            t = [0.0] + [p[0] / 60 for p in r["curve"]]
            a = [100 / r.get("classes", 10)] + [100 * p[1] for p in r["curve"]]
            changed = " (changed)" if r.get("overrides") else ""
            label = (f"{r['model']} {r['data']}, {r['epochs']} ep, seed {r['seed']}, "
                     f"{r['precision'].replace('auto: ', '')}{changed}")
            style = "--" if r.get("machine", "").find("EPYC") < 0 else "-"
            line, = ax.plot(t, a, style, marker="o", ms=2.5, color=colors[i % 10], label=label)
            if r.get("tta_accuracy") is not None:
                ax.plot(t[-1], a[-1], marker="*", ms=11, color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("wall-clock time (minutes, data loading and evaluation included)",
                      fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_xlim(left=0)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1,
                  frameon=False)
    fig.suptitle("Accuracy against wall-clock time, 2-core CPUs (dashed: Xeon with AMX; "
                 "solid: EPYC; star: with test-time augmentation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(FIGURE)
    plt.close(fig)


def cpu_of(r) -> str:
    return r["machine"].split(",")[0].replace("(R)", "")


def note(r) -> str:
    changed = ", ".join([f"`--set {o}`" for o in r.get("overrides", [])]
                        + ([f"`--jpeg {r['jpeg']}`"] if r.get("jpeg") else []))
    return "; ".join(x for x in (changed, r.get("note")) if x)


def write_results(store):
    rows = ["| model | data | precision | epochs | seed | test accuracy | with TTA | wall time "
            "| train images/s | CPU | date | note |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in store["runs"]:
        tta = "" if r["tta_accuracy"] is None else f"{r['tta_accuracy']:.4f} (level {r['tta']})"
        rows.append(f"| {r['model']} | {r['data']} | {r['precision']} | {r['epochs']} | "
                    f"{r['seed']} | {r['accuracy']:.4f} | {tta} | {r['wall_seconds'] / 60:.1f} min "
                    f"| {r['epoch_images_per_s']:.0f} | {cpu_of(r)} | {r['date'][:10]} | {note(r)} |")
    tp = ["| model | precision | batch | images/s | device | date | note |",
          "| --- | --- | ---: | ---: | --- | --- | --- |"]
    for r in store["throughput"]:
        tp.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.0f} "
                  f"| {r['device']} | {r['date'][:10]} | {r['note'] or ''} |")
    notes = "".join(f"- {n}\n" for n in store.get("observations", []))
    notes = f"\n\nObservations (kept in {STORE.name}):\n\n{notes.rstrip()}" if notes else ""
    body = (f"This machine: {cpu_line()}\n\nWall time includes data loading, whitening and every epoch's "
            f"evaluation; 'train images/s' counts the epochs' time (training and validation).\n\n"
            + "\n".join(rows) + "\n\nTraining throughput of the loop's step (random data, the "
            "recipe's options, after warm-up steps):\n\n" + "\n".join(tp) + notes
            + f"\n\n![accuracy against time]({FIGURE.name})\n\nReproduce: "
            "`.venv/bin/python bench/bench_time_to_accuracy.py MODEL:DATA --seeds 0 --tta 0` "
            "with the row's epochs and `--set` overrides (e.g. `mnist-bn:mnist`, "
            "`airbench:cifar10 --tta 2`), and `--throughput MODEL --precisions fp32,bf16`")
    write_section(TITLE, body)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="MODEL:DATASET")
    ap.add_argument("--data-dir", default=SHARED_DATASETS)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--engine", choices=["torch", "numpy"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe option, e.g. --set 'label_smoothing=0.1'")
    ap.add_argument("--eval-fp32", action="store_true",
                    help="also evaluate the final weights in fp32 (after the timed run)")
    ap.add_argument("--jpeg", type=int, metavar="QUALITY",
                    help="experiment: compress every image once more with JPEG at this quality "
                         "(on a shifted 8x8 grid) before training")
    ap.add_argument("--tta", type=int, default=2, choices=[0, 1, 2])
    ap.add_argument("--throughput", metavar="MODEL", help="measure training images/s instead")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--note", default="", help="a remark stored with the runs (e.g. load)")
    ap.add_argument("--verbose", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    store = load_store()
    if args.throughput:
        for prec in args.precisions.split(","):
            ips, dev = throughput(args.throughput, prec, args.batch_size or 256)
            print(f"{args.throughput} {prec}: {ips:.1f} images/s ({dev})")
            store["throughput"].append({
                "model": args.throughput, "precision": prec, "batch": args.batch_size or 256,
                "images_per_s": round(ips, 1), "device": dev, "note": args.note,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    for spec in args.runs:
        model_name, _, data = spec.partition(":")
        for seed in map(int, args.seeds.split(",")):
            r = time_run(model_name, data or zoo.recipe(model_name)["data"], args, seed)
            print(f"{model_name} {data} seed {seed}: accuracy {r['accuracy']:.4f}, TTA "
                  f"{r['tta_accuracy']}, {r['wall_seconds'] / 60:.1f} min")
            store["runs"].append(r)
    STORE.write_text(json.dumps(store, indent=1) + "\n")
    shown = [r for r in store["runs"] if not (r.get("note") or "").startswith(("experiment",
                                                                            "smoke"))]
    if shown:   # experiments and smoke tests stay in the table only
        draw(latest(shown))
    write_results(store)


if __name__ == "__main__":
    main()

"""The `cnnlab` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

EPILOGS = {
    "train": """examples:
  cnnlab train lenet                              # the zoo's lenet on the embedded mnist-5k
  cnnlab train lenet --data mnist --epochs 5 --out runs/lenet-mnist
  cnnlab train cifar-basic --data cifar10 --precision bf16
  cnnlab train my_model.json --data ./photos --val-split 0.2 --early-stopping 3
  cnnlab train lenet --engine numpy --epochs 3    # the from-scratch NumPy engine
  cnnlab train --resume runs/lenet-mnist          # continue after Ctrl-C
  cnnlab train --resume runs/lenet-mnist --epochs 8   # train a finished run further
  cnnlab train cifar-basic --data cifar10 --nproc 2   # data-parallel, 2 processes
  torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
      -m cnnlab.cli train cifar-basic --out runs/c  # the same across machines""",
    "evaluate": """examples:
  cnnlab evaluate runs/demo/model.safetensors --data mnist-5k
  cnnlab evaluate runs/demo --data mnist --json > metrics.json
  cnnlab evaluate runs/airbench --tta 2""",
    "predict": """examples:
  cnnlab predict runs/demo/model.safetensors digit.png other.jpg --top-k 3
  cnnlab predict runs/demo *.png --json""",
    "summary": """examples:
  cnnlab summary lenet
  cnnlab summary runs/demo/model.safetensors --json
  cnnlab summary my_model.json""",
    "datasets": """examples:
  cnnlab datasets
  cnnlab datasets --data-dir /data/sets""",
    "zoo": """examples:
  cnnlab zoo
  cnnlab summary cifar-bn""",
}


class CLIError(Exception):
    pass


def _add_engine(p, default="auto"):
    p.add_argument("--engine", choices=["auto", "torch", "numpy"], default=default,
                   help="engine to run the model with (auto: torch when installed)")


def build_parser() -> argparse.ArgumentParser:
    from .training.config import OPTIMIZERS, SCHEDULES   # one list, the config's
    from .version import __version__
    parser = argparse.ArgumentParser(
        prog="cnnlab", description="Define, train, inspect and serve CNNs for image "
                                   "classification.",
        epilog="Run 'cnnlab COMMAND --help' for the options and examples of each command.",
        allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, allow_abbrev=False, **k)  # --epoch is no --epochs
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a model", epilog=EPILOGS["train"], formatter_class=fmt,
                       description="Train a zoo model or a model described in JSON. Defaults "
                                   "come from the zoo model's recipe; options override them.")
    t.add_argument("model", nargs="?", help="zoo name (see 'cnnlab zoo') or a model .json file")
    t.add_argument("--data", help="dataset name (see 'cnnlab datasets') or an image folder "
                                  "(default: the recipe's, else mnist-5k)")
    t.add_argument("--data-dir", help="where dataset files are looked for and downloaded")
    t.add_argument("--image-size", metavar="HxW",
                   help="resize a folder's images for a zoo model (default: their most "
                        "common size); a .json or .safetensors model fixes its own")
    t.add_argument("--color", choices=["grayscale", "rgb"],
                   help="colour mode for a folder of images (default: rgb if any is colour)")
    t.add_argument("--epochs", type=int, help="(default: the recipe's, else 10)")
    t.add_argument("--batch-size", type=int, help="(default: the recipe's, else 32)")
    t.add_argument("--optimizer", choices=OPTIMIZERS)
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--momentum", type=float, help="SGD/RMSprop momentum")
    t.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (SGD)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=SCHEDULES)
    t.add_argument("--loss", choices=["categorical_crossentropy", "binary_crossentropy", "mse"])
    t.add_argument("--label-smoothing", type=float)
    t.add_argument("--augment", help="e.g. 'translate=0.1,flip,rotate=10,zoom=0.1,noise=0.02,"
                                     "crop=4,fill=zero'; 'none' turns the recipe's off")
    t.add_argument("--standardize", action="store_true", default=None,
                   help="per-channel standardization with training-split statistics")
    t.add_argument("--val-split", type=float,
                   help="fraction of the training data held out for validation "
                        "(default 0: validate on the test split)")
    t.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop when --monitor has not improved for PATIENCE epochs, "
                        "restoring the best weights")
    t.add_argument("--monitor", default="val_loss",
                   choices=["val_loss", "val_accuracy", "loss", "accuracy"])
    t.add_argument("--seed", type=int, help="seed for weights, shuffling, augmentation and "
                                            "dropout (default 0)")
    t.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    t.add_argument("--engine", choices=["auto", "torch", "numpy"],
                   help="auto (default): torch when installed, else the NumPy engine")
    t.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="bf16: mixed precision; auto: bf16 where the hardware runs it "
                        "natively (AVX512-BF16/AMX, CUDA bf16), else fp32 (default auto)")
    t.add_argument("--out", help="run directory (default runs/<model>-<data>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its checkpoint (with --epochs N: extend it to N)")
    t.add_argument("--overwrite", action="store_true",
                   help="allow --out to replace an existing run")
    t.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel training in N processes on this machine (torch "
                        "engine; the recipe's batch is split among them; default 1)")
    t.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes: BatchNorm statistics over the whole batch "
                        "(default: per process)")

    e = sub.add_parser("evaluate", help="loss, accuracy, per-class metrics, confusion matrix",
                       epilog=EPILOGS["evaluate"], formatter_class=fmt)
    e.add_argument("model", help="model file or run directory")
    e.add_argument("--data", default=None, help="dataset (default: the one it was trained on)")
    e.add_argument("--data-dir", help="where dataset files are looked for")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--tta", type=int, nargs="?", const=1, default=0, choices=[0, 1, 2],
                   help="test-time augmentation: 1 (--tta alone) averages each image with "
                        "its mirror; 2 adds 1-pixel shifts (airbench's)")
    e.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="torch engine: bf16 autocast, or auto (bf16 where native)")
    _add_engine(e)

    p = sub.add_parser("predict", help="classify image files", epilog=EPILOGS["predict"],
                       formatter_class=fmt)
    p.add_argument("model", help="model file or run directory")
    p.add_argument("images", nargs="+", help="image files (any size or mode)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--mode", choices=["auto", "drawing", "resize"], default="auto",
                   help="drawing: the MNIST steps (ink light on dark, cropped, 20 px box, "
                        "centred by mass) for handwriting photos and canvas exports; resize: "
                        "plain resize; auto (default): drawing for 28x28 grey models")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_engine(p)

    s = sub.add_parser("summary", help="layers, output shapes and parameter counts",
                       epilog=EPILOGS["summary"], formatter_class=fmt)
    s.add_argument("model", help="zoo name, model .json, model file or run directory")
    s.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("datasets", help="list datasets and where their files are",
                       epilog=EPILOGS["datasets"], formatter_class=fmt)
    d.add_argument("--data-dir")
    d.add_argument("--json", action="store_true")

    z = sub.add_parser("zoo", help="list the built-in architectures and their recipes",
                       epilog=EPILOGS["zoo"], formatter_class=fmt)
    z.add_argument("--json", action="store_true")
    from .extensions import add_parsers
    add_parsers(sub, fmt)
    return parser


# helpers -------------------------------------------------------------------------------
def load_model_arg(arg: str):
    """A zoo name, a JSON description, a model file or a run directory -> Sequential."""
    from .zoo import load_any
    return load_any(arg)


def cmd_train(args):
    from .training import distributed
    if args.nproc is not None and args.nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {args.nproc}")
    if (args.nproc or 1) > 1 and distributed.env_world_size() <= 1:
        return launch_train(args)
    world = distributed.init_from_env(args.device)
    if world.size == 1:
        return _train(args)
    from .datasets import DatasetError
    from .training import TrainingInterrupted
    clean = False      # the ranks end together: after success or an agreed Ctrl-C stop
    try:
        code = _train(args)
        clean = True
        return code
    except Exception as e:
        clean = isinstance(e, TrainingInterrupted)
        if distributed.is_peer_loss(e):
            if os.environ.get("CNNLAB_LAUNCHER"):
                return 1        # the launcher reports which rank went away
            raise CLIError(f"rank {world.rank}: another rank stopped; all ranks stop "
                           f"({str(e).splitlines()[0][:120]})") from None
        if world.is_main or isinstance(e, (OSError, DatasetError)):
            raise
        return 130 if clean else 1   # rank 0 reports
    except KeyboardInterrupt:
        if world.is_main:
            raise
        return 130
    finally:
        distributed.shutdown(clean)


def _worker_argv(argv: list[str], out: str | None) -> list[str]:
    """The command line of a worker: argv without --nproc, with the resolved --out."""
    res, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            res.append(a)
    return res + (["--out", out] if out else [])


def launch_train(args):
    """--nproc N: run this command in N worker processes through torch.distributed.run."""
    from . import zoo
    from .training import TrainConfig, default_run_dir, distributed
    out = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoint.safetensors").exists():
            raise CLIError(f"{run_dir}: no checkpoint.safetensors to resume from")
    elif not args.model:
        raise CLIError("which model? e.g. 'cnnlab train lenet' (see 'cnnlab zoo')")
    else:
        data = args.data or (zoo.recipe(args.model)["data"] if args.model in zoo.MODELS
                             else "mnist-5k")
        run_dir = Path(args.out) if args.out else default_run_dir(TrainConfig(data=data),
                                                                  Path(args.model).stem)
        if (run_dir / "checkpoint.safetensors").exists() and not args.overwrite:
            raise CLIError(f"{run_dir} already holds a run: continue it with 'cnnlab train "
                           f"--resume {run_dir}', or pass --overwrite, or choose another --out")
        out = None if args.out else str(run_dir)
    if args.engine == "numpy":
        raise CLIError("--nproc needs the torch engine")
    os.environ["CNNLAB_LAUNCHER"] = "1"      # tells the workers that this process reports
    try:
        return distributed.launch(args.nproc, _worker_argv(args.argv, out))
    except distributed.LaunchFailed as e:
        if not str(e):
            return e.code
        ckpt = run_dir / "checkpoint.safetensors"
        where = (f"the checkpoint of the last finished epoch is in {ckpt}\nresume with: "
                 f"cnnlab train --resume {run_dir} --nproc {args.nproc}") if ckpt.exists() \
            else "no checkpoint was written yet"
        print(f"error: {e}\n{where}", file=sys.stderr)
        return e.code
    finally:
        os.environ.pop("CNNLAB_LAUNCHER", None)


def _train(args):
    from . import datasets, zoo
    from .augment import parse_augment
    from .training import TrainConfig, default_run_dir, fit, resume_run
    if args.resume:
        if args.model:
            raise CLIError("--resume takes the run directory; give no model with it")
        if args.sync_bn:
            raise CLIError("--sync-bn is part of the run's settings; it cannot change on --resume")
        resume_run(args.resume, epochs=args.epochs)
        return 0
    if not args.model:
        raise CLIError("which model? e.g. 'cnnlab train lenet' (see 'cnnlab zoo')")
    options = {}
    if args.model in zoo.MODELS:
        options.update({k: v for k, v in zoo.recipe(args.model).items() if k != "description"})
    flags = {"data": args.data, "data_dir": args.data_dir, "epochs": args.epochs,
             "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
             "momentum": args.momentum, "nesterov": args.nesterov,
             "weight_decay": args.weight_decay, "schedule": args.schedule, "loss": args.loss,
             "label_smoothing": args.label_smoothing, "augment": parse_augment(args.augment),
             "standardize": args.standardize, "val_split": args.val_split, "seed": args.seed,
             "device": args.device, "engine": args.engine, "precision": args.precision,
             "sync_bn": args.sync_bn}
    options.update({k: v for k, v in flags.items() if v is not None})
    if not options.get("augment"):
        options.pop("augment", None)
    options.setdefault("data", "mnist-5k")
    if args.early_stopping is not None:
        options["early_stopping"] = {"monitor": args.monitor, "patience": args.early_stopping}
    options["verbose"] = 2 if args.quiet else 1
    load_opts = {"data_dir": options.get("data_dir")}
    if args.model in zoo.MODELS:
        if args.image_size:
            load_opts["image_size"] = parse_size(args.image_size)
        elif options["data"] not in datasets.DATASETS:   # a folder: the zoo model's own size
            load_opts["image_size"] = zoo.build(args.model).input_shape[:2]
        if args.color:
            load_opts["color"] = args.color
        ds = datasets.load(options["data"], **load_opts)
        model = zoo.build(args.model, input_shape=ds.input_shape, num_classes=ds.num_classes)
    else:  # the model fixes the image size and colour the data is converted to
        model = load_model_arg(args.model)
        h, w, c = model.input_shape
        ds = datasets.load(options["data"], image_size=(h, w),
                           color="grayscale" if c == 1 else "rgb", **load_opts)
        if not model.fresh:
            print(f"Continuing from the weights in {args.model}")
    options["model"] = args.model
    cfg = TrainConfig.from_dict(dict(options))
    out = Path(args.out) if args.out else default_run_dir(cfg, Path(args.model).stem)
    if (out / "checkpoint.safetensors").exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a run: continue it with 'cnnlab train --resume "
                       f"{out}', or pass --overwrite, or choose another --out")
    options["out"] = str(out)
    fit(model, ds, **options)
    print(f"\nNext: cnnlab evaluate {out}\n"
          f"      cnnlab report {out}\n"
          f"      cnnlab predict {out} IMAGE.png\n"
          f"      cnnlab serve {out}")
    return 0


def parse_size(text: str):
    try:
        h, _, w = text.lower().partition("x")
        size = (int(h), int(w or h))
        if min(size) < 1:
            raise ValueError
        return size
    except ValueError:
        raise CLIError(f"--image-size takes HxW, e.g. 64x64, got {text!r}") from None


def run_data_dir(model_arg):
    """The --data-dir a run directory was trained with (from its config.json), if any."""
    config = Path(model_arg) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("train", {}).get("data_dir")
        except (OSError, ValueError):
            return None
    return None


def _dataset_for(model, data):
    if data:
        return data
    ds = (model.meta.get("training") or {}).get("dataset")
    if not ds or ds == "arrays":
        raise CLIError("which dataset? pass --data (the model file does not name one)")
    return ds


def cmd_evaluate(args):
    from .console import table
    from .evaluate import evaluate
    model = load_model_arg(args.model)
    res = evaluate(model, _dataset_for(model, args.data), engine=args.engine,
                   data_dir=args.data_dir or run_data_dir(args.model), tta=args.tta,
                   precision=args.precision)
    if args.json:
        print(json.dumps({k: res[k] for k in ("accuracy", "top5_accuracy", "loss", "loss_name",
                                              "per_class", "confusion_matrix", "class_names",
                                              "images", "tta") if k in res}))
        return 0
    tta = f", test-time augmentation level {args.tta}" if args.tta else ""
    print(f"{res['dataset']}: {res['images']:,} test images, engine {res['engine']}{tta}")
    top5 = f"   top-5 {res['top5_accuracy']:.4f}" if "top5_accuracy" in res else ""
    print(f"accuracy {res['accuracy']:.4f}{top5}   loss {res['loss']:.4f} "
          f"({res['loss_name']})\n")
    rows = [(r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
             r["support"]) for r in res["per_class"]]
    print(table(["class", "precision", "recall", "f1", "support"], rows))
    names = res["class_names"]
    if len(names) <= 20:
        cm_rows = [[names[i]] + row for i, row in enumerate(res["confusion_matrix"])]
        print(table(["true \\ pred"] + names, cm_rows,
                    title="Confusion matrix (rows: true class)"))
    else:
        print(f"Confusion matrix: {len(names)} classes; see --json or 'cnnlab report'")
    if res["most_confused"]:
        print("Most confused: " + ", ".join(f"{a} -> {b} ({n})"
                                            for a, b, n in res["most_confused"]))
    return 0


def cmd_predict(args):
    import numpy as np
    from .inputs import ImageInputError, read_file
    from .predict import predict_proba, top_k
    model = load_model_arg(args.model)
    good, arrays, failed = [], [], []
    for path in args.images:
        try:
            arrays.append(read_file(model, path, args.mode))
            good.append(path)
        except ImageInputError as e:
            failed.append((path, str(e)))
        except OSError as e:
            failed.append((path, f"{path}: {e.strerror or e}"))
    for _, msg in failed:
        print(f"error: {msg}", file=sys.stderr)
    results = []
    if arrays:
        probs = predict_proba(model, np.stack(arrays), engine=args.engine)
        for path, top in zip(good, top_k(model, probs, max(1, args.top_k))):
            results.append({"file": path, "top": [{"label": lab, "probability": round(p, 6)}
                                                  for lab, p in top]})
    if args.json:
        print(json.dumps({"predictions": results,
                          "errors": [{"file": f, "error": m} for f, m in failed]}))
    else:
        for r in results:
            best = r["top"][0]
            rest = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"][1:])
            print(f"{r['file']}: {best['label']} ({best['probability']:.3f})"
                  + (f"   [{rest}]" if rest else ""))
    return 1 if failed else 0


def cmd_summary(args):
    model = load_model_arg(args.model)
    if args.json:
        d = model.summary_dict()
        print(json.dumps({"layers": d["layers"], "total_params": d["total_params"],
                          "trainable_params": d["trainable_params"],
                          "non_trainable_params": d["non_trainable_params"]}))
    else:
        model.summary()
        tr = model.meta.get("training")
        if tr:
            acc = tr.get("test_accuracy")
            print(f" Trained on {tr.get('dataset')} for {tr.get('epochs')} epochs"
                  + (f", test accuracy {acc:.4f}" if acc is not None else ""))
    return 0


def cmd_datasets(args):
    from .console import table
    from .datasets import list_datasets
    rows = list_datasets(args.data_dir)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(table(["dataset", "status", "where", "description"],
                [(r["name"], "ready" if r["available"] else
                  "missing " + (r["missing"][0] if len(r["missing"]) == 1
                                else f"{len(r['missing'])} files"),
                  r["path"] or "-", r.get("description", "")) for r in rows],
                justify={i: "left" for i in range(4)}))
    from .datasets import data_dirs
    print("Looked in: " + ", ".join(str(p) for p in data_dirs(args.data_dir)) +
          "\nMissing files are downloaded on first use; or put them there by hand.")
    return 0


def cmd_zoo(args):
    from . import zoo
    from .console import table
    rows = []
    for name in zoo.MODELS:
        m, r = zoo.build(name), zoo.recipe(name)
        rows.append({"name": name, "params": m.count_params()[0], "input": list(m.input_shape),
                     **r, "measured": zoo.measured(name)})
    if args.json:
        print(json.dumps(rows))
        return 0

    def measured(m):
        if not m:
            return "not measured yet"
        acc = f"{100 * m['accuracy']:.2f}%"
        if m.get("tta_accuracy"):
            acc += f" ({100 * m['tta_accuracy']:.2f}% TTA)"
        return f"{acc} on {m['data']} in {m['minutes']:.1f} min, {m['machine']}"
    print(table(["model", "params", "input", "description"],
                [(r["name"], f"{r['params']:,}", "x".join(map(str, r["input"])),
                  r["description"]) for r in rows],
                justify={0: "left", 3: "left"}))
    print(table(["model", "recipe (cnnlab train MODEL)", "measured (reference machine)"],
                [(r["name"], f"{r['data']}, {r['optimizer']} lr {r['lr']:g}, {r['epochs']} "
                  f"epochs, batch {r['batch_size']}" + (", augmented" if r.get("augment") else ""),
                  measured(r["measured"])) for r in rows],
                justify={0: "left", 1: "left", 2: "left"}))
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "summary": cmd_summary, "datasets": cmd_datasets, "zoo": cmd_zoo}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line, `warning: ...`, as errors are shown."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    warnings.showwarning = _show_warning
    try:  # Ctrl-C while starting up (parser, imports): nothing began, exit quietly
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if not args.command:
            parser.print_help()
            return 2
        from .datasets import DatasetError
        from .fileformat import ModelFileError
        from .layers import ModelError
        from .training import TrainingError, TrainingInterrupted
        from .extensions import COMMANDS as EXTRA
        handler = COMMANDS.get(args.command) or EXTRA[args.command]
    except KeyboardInterrupt:
        return 130
    try:
        return handler(args)
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CLIError, DatasetError, ModelFileError, ModelError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ImportError as e:
        print(f"error: {e.name or e} is not installed; the torch engine needs PyTorch "
              "(use --engine numpy)", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def run() -> None:
    """`python -m cnnlab` / `python -m cnnlab.cli`: main(), then the exit a worker of
    torchrun or --nproc needs."""
    code = main()
    if "torch.distributed" in sys.modules and os.environ.get("TORCHELASTIC_RUN_ID"):
        from .training.distributed import exit_worker
        exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    run()

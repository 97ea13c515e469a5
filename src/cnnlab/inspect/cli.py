"""`cnnlab report`: the HTML report from the command line."""
from __future__ import annotations

import sys

EPILOG = """examples:
  cnnlab report runs/demo                         # data: the one it was trained on
  cnnlab report runs/demo --data mnist-5k --out /tmp/demo-report
  cnnlab report model.safetensors --data cifar10 --data-dir /data/sets --images 32
  cnnlab report runs/demo --patch 6 --stride 3 --engine numpy"""


def add_parser(subparsers, formatter_class):
    p = subparsers.add_parser(
        "report", help="an HTML report: metrics, mistakes, filters, feature maps, "
                       "activation maximization, occlusion, saliency, Grad-CAM",
        description="Write a self-contained HTML report (figures embedded, opens offline) "
                    "plus each figure as a PNG, and print its path.",
        epilog=EPILOG, formatter_class=formatter_class)
    p.add_argument("model", metavar="MODEL_OR_RUN_DIR", help="model file or run directory "
                                                             "(a run's history.csv is used)")
    p.add_argument("--data", help="dataset name or image folder (default: the one the model "
                                  "was trained on)")
    p.add_argument("--data-dir", help="where dataset files are looked for")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report, or "
                                 "report-<file name> beside the model file)")
    p.add_argument("--images", type=int, default=16,
                   help="random test images and top-loss mistakes to show (default 16)")
    p.add_argument("--patch", type=int, default=4, help="occlusion patch size (default 4)")
    p.add_argument("--stride", type=int, default=2, help="occlusion stride (default 2)")
    p.add_argument("--steps", type=int, default=128,
                   help="activation maximization steps (default 128)")
    p.add_argument("--filters", type=int, default=16,
                   help="filters per conv layer to maximize (default 16)")
    p.add_argument("--seed", type=int, default=0, help="which random images are shown")
    p.add_argument("--engine", choices=["auto", "torch", "numpy"], default="auto",
                   help="engine to run the model with (auto: torch when installed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from .report import write_report
    for name in ("images", "patch", "stride", "filters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.steps < 0:
        raise ValueError("--steps must be at least 0")
    path = write_report(args.model, args.data, args.out, images=args.images,
                        engine=args.engine, data_dir=args.data_dir, patch=args.patch,
                        stride=args.stride, steps=args.steps, max_filters=args.filters,
                        seed=args.seed, progress=None if args.quiet else sys.stderr)
    print(path)
    return 0

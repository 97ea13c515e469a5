"""Run every benchmark, one after another (never two at once: they share the cores).

    python bench/run_all.py            # the quick set: minutes
    python bench/run_all.py --full     # adds the CIFAR-10 accuracy runs (hours on a CPU)
"""
import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--full", action="store_true")
args = ap.parse_args()
runs = [["bench_train.py"], ["bench_numpy.py"], ["bench_report.py"],
        ["bench_serve.py", "--seconds", "60"], ["bench_accuracy.py", "lenet:mnist"]]
if args.full:   # the zoo recipes' time to accuracy (their figures feed zoo.MEASURED)
    runs += [["bench_time_to_accuracy.py", "mnist-fast:mnist", "mnist-bn:mnist",
              "mnist-bn:fashion-mnist", "lenet:mnist", "cifar-basic:cifar10", "cifar-improved:cifar10", "--tta", "0"],
             ["bench_time_to_accuracy.py", "airbench:cifar10", "--seeds", "0,1,2"],
             ["bench_cpu_choices.py"]]
for run in runs:
    print(f"== {' '.join(run)}", flush=True)
    code = subprocess.call([sys.executable, str(HERE / run[0]), *run[1:]])
    if code:
        sys.exit(code)

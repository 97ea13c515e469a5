"""Shared test settings: where the real datasets are (beside the checkout, or
$CNNLAB_SHARED_DATASETS); tests that need them skip with that reason when absent."""
import os
from pathlib import Path

SHARED_DATASETS = Path(os.environ.get("CNNLAB_SHARED_DATASETS")
                       or Path(__file__).resolve().parents[2] / "shared" / "datasets")

# One thread everywhere: under load, several OpenMP threads on 2 cores stall each other
# (a 30 s test took 440 s). Subprocesses (the CLI) inherit the environment.
os.environ["OMP_NUM_THREADS"] = "1"
# The tests compare numbers exactly: `--precision auto` (the default) means fp32 here,
# whatever the CPU; the tests of `auto` itself unset it.
os.environ["CNNLAB_PRECISION"] = "fp32"
os.environ.setdefault("KERAS_BACKEND", "torch")   # Keras 3, the tests' oracle, runs on torch
try:
    import torch
    torch.set_num_threads(1)
except ImportError:
    pass

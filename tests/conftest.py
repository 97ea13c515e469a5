"""Shared test settings: where the real datasets are (beside the checkout, or
$CNNLAB_SHARED_DATASETS); tests that need them skip with that reason when absent."""
import os
from pathlib import Path

SHARED_DATASETS = Path(os.environ.get("CNNLAB_SHARED_DATASETS")
                       or Path(__file__).resolve().parents[2] / "shared" / "datasets")

"""The NumPy engine, the model file, the datasets and prediction never import torch.

`make test` also runs this file in a second virtual environment without PyTorch.
"""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import cnnlab
    from cnnlab import datasets, zoo
    from cnnlab.evaluate import evaluate
    from cnnlab.training import fit

    ds = datasets.load("mnist-5k")
    model = zoo.build("lenet")
    x, y = ds.x_train[:256], ds.y_train[:256]
    hist = fit(model, (x, y), epochs=2, engine="numpy", lr=3e-3, verbose=0)
    path = model.save(sys.argv[1])
    again = cnnlab.load(path)
    probs = again.predict(ds.x_test[:20], engine="numpy")
    assert probs.shape == (20, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    res = evaluate(again, "mnist-5k", engine="numpy")
    imported = "torch" in sys.modules
    print(json.dumps({"torch_imported": imported,
                      "loss": [h["loss"] for h in hist], "accuracy": res["accuracy"]}))
""")


def test_numpy_paths_do_not_import_torch(tmp_path):
    import json
    import os
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.safetensors")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch_imported"] is False
    assert out["loss"][1] < out["loss"][0]           # it learns
    assert out["accuracy"] > 0.5


def test_auto_engine_follows_what_is_installed():
    """auto picks torch where it is installed and the NumPy engine where it is not."""
    import cnnlab
    from cnnlab.engines import get_engine
    from cnnlab.training import TrainConfig
    installed = importlib.util.find_spec("torch") is not None
    model = cnnlab.zoo.build("litecnn")
    assert get_engine(model, "auto").name == ("torch" if installed else "numpy")
    assert TrainConfig().check().engine == ("torch" if installed else "numpy")


TRAIN_AUGMENTED = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails, as where it is not installed
    from cnnlab.cli import main
    sys.exit(main(["train", "lenet", "--data", "mnist-5k", "--engine", "numpy", "--epochs", "1",
                   "--augment", "translate=0.1,flip,rotate=10,zoom=0.1,noise=0.02,crop=2",
                   "--quiet", "--out", sys.argv[1]]))
""")


def test_numpy_engine_trains_with_augmentation_without_torch(tmp_path):
    import csv
    import os
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", TRAIN_AUGMENTED, str(run)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (run / "model.safetensors").is_file()
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["val_accuracy"]) > 0.5

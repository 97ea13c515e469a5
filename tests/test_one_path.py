"""One meaning for each thing: the same input path from Python and the CLI, the same loss
in the history, the model file and `evaluate`, the same metric rules in both engines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab import Dense, Flatten, Input, Sequential, datasets, zoo
from cnnlab.engines.base import Tally, predicted_classes, true_class_rank
from cnnlab.engines.numpy.engine import NumpyEngine
from cnnlab.inputs.drawing import prepare
from cnnlab.losses import LossError
from cnnlab.training import TrainingError, fit

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def mnist():
    return datasets.load("mnist-5k")


def photo_of(digit: np.ndarray, size=(160, 120)) -> Image.Image:
    """A 'photo': dark ink on light grey paper, larger than 28x28, not centred."""
    ink = np.asarray(Image.fromarray(digit).resize((70, 70)), np.float32) / 255
    page = np.full((size[1], size[0]), 215.0, np.float32)
    page[20:90, 60:130] -= 170 * ink
    return Image.fromarray(page.clip(0, 255).astype(np.uint8)).convert("RGB")


def transparent_png_of(digit: np.ndarray) -> Image.Image:
    """A canvas export: black strokes on a transparent background."""
    alpha = np.asarray(Image.fromarray(digit).resize((200, 200)))
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA")


def test_python_predict_and_cli_predict_read_files_the_same_way(mnist, tmp_path):
    model = zoo.build("lenet")
    model.meta["training"] = {"dataset": "mnist"}
    path = model.save(tmp_path / "lenet.safetensors")
    files = [tmp_path / "photo.jpg", tmp_path / "canvas.png"]
    photo_of(mnist.x_test[0, :, :, 0]).save(files[0], quality=92)
    transparent_png_of(mnist.x_test[1, :, :, 0]).save(files[1])
    probs = model.predict(files)
    # the drawing pipeline, not a plain resize: the input is what prepare() makes
    for f, p in zip(files, probs):
        image, mode = prepare(model, f.read_bytes())
        assert mode == "drawing"
        np.testing.assert_allclose(model.predict(image[None]), p[None], atol=1e-6)
    plain = np.asarray(Image.open(files[0]).convert("L").resize((28, 28)))[None, ..., None]
    assert not np.allclose(model.predict(plain), probs[:1], atol=1e-3)
    r = subprocess.run([sys.executable, "-m", "cnnlab.cli", "predict", str(path), *map(str, files),
                        "--json", "--top-k", "10"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": SRC}, timeout=120)
    assert r.returncode == 0, r.stderr
    for p, pred in zip(probs, json.loads(r.stdout)["predictions"]):
        cli = {t["label"]: t["probability"] for t in pred["top"]}
        np.testing.assert_allclose([cli[str(k)] for k in range(10)], p, atol=1e-5)
    assert model.predict(files, mode="resize").shape == (2, 10)


@pytest.mark.parametrize("engine", ["torch", "numpy"])
@pytest.mark.parametrize("loss,out", [("categorical_crossentropy", Dense(3, activation="softmax")),
                                      ("mse", Dense(3, activation="softmax")),
                                      ("binary_crossentropy", Dense(1, activation="sigmoid"))])
def test_one_loss_in_history_model_file_and_evaluate(engine, loss, out, tmp_path):
    if engine == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    k = 2 if out.units == 1 else 3
    y = rng.integers(0, k, 300)
    x = rng.integers(0, 60, (300, 6, 6, 1)).astype(np.uint8)
    x[np.arange(300), y, y] = 255                     # a learnable mark per class
    test = (x[:100], y[:100])
    model = Sequential([Input((6, 6, 1)), Flatten(), Dense(8, activation="relu"), out])
    from cnnlab.datasets import Dataset
    ds = Dataset("marks", x[100:], y[100:], *test, [str(i) for i in range(k)], "arrays")
    history = fit(model, ds, epochs=2, loss=loss, engine=engine, verbose=0,
                  label_smoothing=0.1 if loss != "mse" else 0.0, out=str(tmp_path / "run"))
    val_loss = history[-1]["val_loss"]
    from cnnlab import load
    saved = load(tmp_path / "run")
    assert saved.meta["loss"] == loss
    assert saved.meta["training"]["test_loss"] == pytest.approx(val_loss, abs=1e-5)
    for eng in ("numpy", "torch") if engine == "torch" else ("numpy",):
        res = saved.evaluate(test, engine=eng)
        assert res["loss_name"] == loss
        assert res["loss"] == pytest.approx(val_loss, abs=1e-5)
        assert res["accuracy"] == pytest.approx(history[-1]["val_accuracy"], abs=1e-9)


def test_top5_is_never_below_top1_and_ties_break_as_argmax():
    model = zoo.build("lenet")
    rng = np.random.default_rng(1)
    z = rng.integers(0, 3, (500, 10)).astype(np.float32)   # many ties
    z[:50] = 0                                              # all equal
    y = rng.integers(0, 10, 500)
    y[:50] = 0
    t = Tally()
    t.add_batch(model, 0.0, z, y)
    logs = t.logs(True)
    assert logs["accuracy"] == (z.argmax(1) == y).mean()
    assert (true_class_rank(z, y) == 0).sum() == t.correct
    assert logs["top5_accuracy"] >= logs["accuracy"]
    assert t.top5 >= t.correct + 50 - (z[:50].argmax(1) == 0).sum()
    # by hand: the rank counts larger logits and equal ones with a smaller index
    zz, yy = np.array([[1.0, 3.0, 3.0, 0.0]]), np.array([2])
    assert true_class_rank(zz, yy)[0] == 1
    torch = pytest.importorskip("torch")
    from cnnlab.engines.torch.backend import count_batch
    correct, top5 = count_batch(model, torch.tensor(z), torch.tensor(y))
    assert int(correct) == t.correct and int(top5) == t.top5


def test_one_unit_outputs_mean_the_same_in_both_engines():
    linear = Sequential([Input((4, 4, 1)), Flatten(), Dense(1)])
    x, y = np.zeros((4, 4, 4, 1), np.uint8), np.array([0, 1, 0, 1])
    for engine in ("numpy", "torch"):
        with pytest.raises(TrainingError, match="1-unit output is a binary classifier only "
                                                "with a sigmoid"):
            fit(linear, (x, y), loss="mse", engine=engine, epochs=1, verbose=0)
    with pytest.raises(LossError):
        NumpyEngine(linear).loss_and_grads(x.astype(np.float32), y, "mse")
    sig = Sequential([Input((4, 4, 1)), Flatten(), Dense(1, activation="sigmoid")])
    assert list(predicted_classes(sig, np.array([[-1.0], [0.5]]))) == [0, 1]


def test_float_images_mean_the_same_to_fit_predict_and_evaluate():
    model = zoo.build("lenet")
    bad = np.full((2, 28, 28, 1), 200.0)             # 0..255 floats: not divided by 255
    for call in (lambda: model.predict(bad), lambda: model.evaluate((bad, np.array([0, 1]))),
                 lambda: fit(model, (bad, np.array([0, 1])), epochs=1, verbose=0)):
        with pytest.raises((ValueError, TrainingError), match=r"float images must be in \[0, 1\]"):
            call()
    ok = np.full((2, 28, 28, 1), 200 / 255)
    np.testing.assert_allclose(model.predict(ok, engine="numpy"),
                               model.predict(np.full((2, 28, 28, 1), 200, np.uint8),
                                             engine="numpy"), atol=1e-6)

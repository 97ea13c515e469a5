"""The command line, run the way a user runs it: output, exit codes, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cnnlab(*args, timeout=300, cwd=None):
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = cnnlab("train", "lenet", "--epochs", 2, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Epoch 2/2" in r.stdout and "Test accuracy" in r.stdout
    epoch_lines = [line for line in r.stdout.splitlines() if "loss:" in line]
    assert len(epoch_lines) == 2 and epoch_lines[0].startswith("Epoch 1/2 - ")  # --quiet
    assert "2 epochs," in r.stdout                # the header counts in words a user reads
    assert "cnnlab evaluate" in r.stdout          # says what to try next
    return out


def test_help_has_examples_for_every_command():
    r = cnnlab("--help")
    assert r.returncode == 0
    for cmd in ("train", "evaluate", "predict", "summary", "datasets", "zoo"):
        assert cmd in r.stdout
        h = cnnlab(cmd, "--help")
        assert h.returncode == 0 and "examples:" in h.stdout, cmd


def test_summary_json_matches_keras_counts():
    r = cnnlab("summary", "cifar-basic", "--json")
    d = json.loads(r.stdout)
    assert d["total_params"] == 477_994 and d["non_trainable_params"] == 0
    assert d["layers"][0] == {"name": "conv2d", "type": "Conv2D",
                              "output_shape": [None, 30, 30, 32], "params": 896}
    r = cnnlab("summary", "lenet")
    assert "Total params: 8,790" in r.stdout


def test_evaluate_json_is_consistent(run_dir):
    r = cnnlab("evaluate", run_dir, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    cm = np.array(d["confusion_matrix"])
    assert cm.sum() == d["images"] == 1000
    assert abs(np.trace(cm) / cm.sum() - d["accuracy"]) < 1e-9
    assert len(d["per_class"]) == 10 and {"precision", "recall", "f1"} <= set(d["per_class"][0])
    text = cnnlab("evaluate", run_dir).stdout
    assert "Confusion matrix" in text and "precision" in text


def test_predict_reports_bad_files_and_predicts_the_rest(run_dir, tmp_path):
    from cnnlab import datasets
    ds = datasets.load("mnist-5k")
    good = tmp_path / "digit.png"
    Image.fromarray(ds.x_test[0, :, :, 0]).resize((100, 80)).convert("RGB").save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = cnnlab("predict", run_dir, good, bad, "--json")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert [p["file"] for p in d["predictions"]] == [str(good)]
    assert len(d["predictions"][0]["top"]) == 3
    assert d["errors"][0]["file"] == str(bad)
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "resnet999"], "not a zoo model"),
    (["train", "lenet", "--data", "nosuchset"], "nosuchset"),
    (["train", "lenet", "--augment", "twirl=3"], "twirl"),
    (["train", "lenet", "--epochs", "0"], "epochs must be >= 1"),
    (["summary", "missing.safetensors"], "missing.safetensors: no such file"),
    (["summary", "nothere.json"], "nothere.json: no such file"),
    (["summary", "nothere"], "not a zoo model"),
    (["train", "lenet", "--device", "cuda:1"], "cuda:1"),
    (["train", "lenet", "--engine", "numpy", "--device", "cuda"], "NumPy engine runs on the CPU"),
    (["train", "lenet", "--engine", "numpy", "--precision", "bf16"], "computes in float32"),
    (["evaluate", "lenet"], "which dataset"),
])
def test_bad_arguments_give_one_clear_error(args, message):
    r = cnnlab(*args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.startswith("error:")
    assert "Traceback" not in r.stderr


def test_unknown_option_is_a_usage_error():
    r = cnnlab("train", "lenet", "--epoch", "3")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "train", "lenet", "--epochs", "50",
                          "--out", str(out), "--quiet"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert f"resume with: cnnlab train --resume {out}" in stderr
    assert "Traceback" not in stderr
    from cnnlab import load
    from cnnlab.fileformat import unpack
    _, meta = unpack(out / "checkpoint.safetensors")
    assert meta["trainer"]["epoch"] >= 1
    assert load(out / "model.safetensors").count_params()[0] == 8790


def test_folder_training_with_a_json_model_resizes_and_remembers_the_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for label, value in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(12):
            img = np.clip(rng.normal(value, 20, size=(30, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    model_json = tmp_path / "tiny.json"
    model_json.write_text(json.dumps({"input_shape": [16, 16, 3], "layers": [
        {"type": "Conv2D", "config": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
        {"type": "GlobalAvgPool2D"}, {"type": "Dense", "config": {"units": 2,
                                                                 "activation": "softmax"}}]}))
    out = tmp_path / "run"
    r = cnnlab("train", model_json, "--data", root, "--epochs", 2, "--out", out, "--quiet",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cnnlab("evaluate", out, "--json", cwd="/")          # from elsewhere: absolute folder
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images"] > 0
    r = cnnlab("train", model_json, "--data", root, "--out", out, cwd=tmp_path)
    assert r.returncode == 1 and "already holds a run" in r.stderr


def test_predict_reads_canvas_exports_like_drawn_digits(run_dir, tmp_path):
    """Dark ink on a transparent background (what a canvas exports) is read as MNIST."""
    from cnnlab import datasets
    ds = datasets.load("mnist-5k")
    paths = []
    for i in range(10):
        ink = ds.x_test[i, :, :, 0]
        rgba = np.zeros((28, 28, 4), np.uint8)
        rgba[..., 3] = ink                           # black strokes, alpha = ink
        img = Image.fromarray(rgba, "RGBA").resize((200, 200), Image.LANCZOS)
        paths.append(tmp_path / f"canvas{i}.png")
        img.save(paths[-1])
    raw = json.loads(cnnlab("predict", run_dir, *[tmp_path / f"canvas{i}.png" for i in range(10)],
                            "--json").stdout)
    labels = [int(p["top"][0]["label"]) for p in raw["predictions"]]
    assert np.mean(np.array(labels) == ds.y_test[:10]) >= 0.8
    plain = json.loads(cnnlab("predict", run_dir, *paths, "--json", "--mode", "resize").stdout)
    assert len({p["top"][0]["label"] for p in plain["predictions"]}) <= 2   # all black: one guess


def test_tables_fit_an_80_column_terminal_without_cutting_words(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for cmd in ("zoo", "datasets"):
        r = cnnlab(cmd)
        assert r.returncode == 0, r.stderr
        assert max(len(line) for line in r.stdout.splitlines()) <= 80, cmd
    words = set(cnnlab("zoo").stdout.split())
    assert {"notebook", "augmentation", "convolutions"} <= words


def test_confusion_table_keeps_whole_class_names(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for label in ("circle", "square", "triangle"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                root / label / f"{i}.png")
    model = tmp_path / "m.json"
    model.write_text(json.dumps({"input_shape": [8, 8, 1], "layers": [
        {"type": "Flatten"}, {"type": "Dense", "units": 3, "activation": "softmax"}]}))
    out = tmp_path / "run"
    r = cnnlab("train", model, "--data", root, "--epochs", 1, "--val-split", 0.25, "--out", out,
               "--quiet")
    assert r.returncode == 0, r.stderr
    r = cnnlab("evaluate", out, "--data", root)
    assert r.returncode == 0, r.stderr
    assert "triangle" in r.stdout.split("Confusion matrix")[1]

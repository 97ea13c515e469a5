"""ONNX export, checked with onnx.checker and run in onnxruntime against cnnlab's engines."""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install -e '.[interop]'")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the test oracle) is not "
                                                "installed: pip install -e '.[test]'")

from cnnlab import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout,  # noqa: E402
                    Flatten, GlobalAvgPool2D, GlobalMaxPool2D, Input, MaxPool2D, Sequential,
                    preprocess, zoo)
from cnnlab.engines import get_engine  # noqa: E402
from cnnlab.interop.onnx_export import OPSET, build_onnx, export_onnx  # noqa: E402


def session(proto_or_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    src = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") \
        else str(proto_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def randomize(m, seed):
    """Random weights, BatchNorm statistics and preprocessing statistics."""
    rng = np.random.default_rng(seed)
    m.init_weights(seed)
    for k, v in m.weights.items():
        if "moving_variance" in k:
            m.weights[k] = rng.uniform(0.5, 2, v.shape).astype(np.float32)
        elif not k.endswith("kernel"):
            m.weights[k] = rng.normal(0, 0.3, v.shape).astype(np.float32)
    c = m.input_shape[-1]
    m.meta = {"class_names": [f"c{i}" for i in range(m.num_classes)],
              "preprocessing": {"scale": 1 / 255, "mean": rng.uniform(0, .5, c).tolist(),
                                "std": rng.uniform(.2, 1, c).tolist()}}
    return m


def compare(m, seed=0, layouts=("NHWC", "NCHW")):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (5, *m.input_shape), dtype=np.uint8)
    want = get_engine(m, "numpy").predict_proba(preprocess.apply(m.meta["preprocessing"], x))
    for layout in layouts:
        proto = build_onnx(m, layout)
        s = session(proto)
        xi = x.astype(np.float32)
        if layout == "NCHW" and xi.ndim == 4:
            xi = xi.transpose(0, 3, 1, 2)
        got = s.run(["probabilities"], {"pixels": xi})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=layout)
        one = s.run(["probabilities"], {"pixels": xi[:1]})[0]      # dynamic batch
        np.testing.assert_allclose(one, want[:1], atol=1e-5)


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo_models_in_onnxruntime(name):
    compare(randomize(zoo.build(name), 1))


RANDOM = [
    # every padding mode, both pools (uneven 'same'), BatchNorm on images and vectors
    [Input((11, 9, 2)), Conv2D(3, 3, padding="full", activation="gelu"),
     Conv2D(4, (3, 2), strides=2, padding="same", activation="leaky_relu", use_bias=False),
     AvgPool2D(3, strides=2, padding="same"), BatchNorm(epsilon=1e-5),
     Conv2D(3, 1, padding=[1, 2], activation="elu"), MaxPool2D(2, padding="same"),
     Flatten(), Dense(6, activation="softplus"), BatchNorm(), Dropout(0.3),
     Dense(4, activation="softmax")],
    [Input((8, 8, 3)), Conv2D(4, 3, activation="tanh"), Activation("softmax"),
     GlobalMaxPool2D(), Dense(3)],                                   # logits: softmax added
    [Input((7, 7, 1)), Conv2D(2, 3, padding="same", activation="sigmoid"), GlobalAvgPool2D(),
     Dense(1, activation="sigmoid")],                                # one sigmoid unit
    [Input((12,)), Dense(5, activation="relu"), Dense(3, activation="sigmoid")],
]


@pytest.mark.parametrize("i", range(len(RANDOM)))
def test_architectures_across_the_vocabulary(i):
    compare(randomize(Sequential(RANDOM[i]), 10 + i), seed=i)


def test_graph_is_checked_and_documented(tmp_path):
    m = randomize(zoo.build("lenet"), 2)
    path = export_onnx(m, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == m.meta["class_names"]
    assert json.loads(props["preprocessing"]) == m.meta["preprocessing"]
    assert props["input_layout"] == "NHWC"
    inp = proto.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "pixels" and dims == ["batch", 28, 28, 1]
    assert "Dropout" not in {n.op_type for n in proto.graph.node}


def test_trained_model_same_accuracy_in_onnxruntime(tmp_path):
    """A model trained on mnist-5k classifies its test split in onnxruntime exactly as
    cnnlab does (same predictions, same accuracy)."""
    from cnnlab import datasets
    try:
        ds = datasets.load("mnist-5k", download=False, progress=False)
    except Exception as e:  # noqa: BLE001 - any reason the embedded digits are missing
        pytest.skip(f"mnist-5k is not available: {e}")
    m = Sequential([Input((28, 28, 1)), Conv2D(8, 3, activation="relu"), MaxPool2D(),
                    Conv2D(8, 3, activation="relu"), MaxPool2D(), Flatten(),
                    Dense(10, activation="softmax")])
    m.fit(ds, epochs=2, batch_size=32, optimizer="adam", lr=3e-3, engine="numpy", verbose=0,
          seed=0)
    m.meta.setdefault("class_names", ds.class_names)
    x, y = ds.x_test, ds.y_test
    cn = get_engine(m, "numpy").predict_proba(preprocess.apply(preprocess.preprocessing_of(m),
                                                                x))
    s = session(export_onnx(m, tmp_path / "mnist.onnx"))
    ox = s.run(["probabilities"], {"pixels": x.astype(np.float32)})[0]
    acc_cnnlab, acc_onnx = (cn.argmax(1) == y).mean(), (ox.argmax(1) == y).mean()
    assert acc_cnnlab > 0.85         # it did learn
    assert acc_onnx == acc_cnnlab
    np.testing.assert_allclose(ox, cn, atol=1e-5)


def test_cli_export_onnx(tmp_path):
    import os
    import subprocess
    import sys
    m = randomize(zoo.build("lenet5"), 4)
    m.save(tmp_path / "m.safetensors")
    r = subprocess.run([sys.executable, "-m", "cnnlab.cli", "export", "m.safetensors",
                        "--format", "onnx", "--layout", "NCHW", "-o", "m.onnx"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert f"ONNX opset {OPSET}" in r.stdout and "(batch, 10)" in r.stdout
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    got = session(tmp_path / "m.onnx").run(None, {"pixels": x.transpose(0, 3, 1, 2)
                                                  .astype(np.float32)})[0]
    want = get_engine(m, "numpy").predict_proba(preprocess.apply(m.meta["preprocessing"], x))
    np.testing.assert_allclose(got, want, atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "cnnlab.cli", "export", "lenet", "--format",
                        "onnx", "-o", "m.keras"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr == "error: m.keras: an ONNX file is named *.onnx\n"

"""Keras files in and out, checked against Keras 3 itself (torch backend).

Keras builds random architectures across cnnlab's vocabulary and saves them as .keras,
.h5 and JSON + weights; cnnlab imports each and both engines must give Keras' outputs
within 1e-5; exported .keras files must load back in Keras with the same outputs.
"""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch", reason="Keras' torch backend needs PyTorch")
keras = pytest.importorskip("keras", reason="keras (the test oracle) is not installed: "
                                            "pip install -e '.[test,interop]'")
pytest.importorskip("h5py", reason="h5py is not installed: pip install -e '.[interop]'")

import cnnlab  # noqa: E402
from cnnlab import preprocess, zoo  # noqa: E402
from cnnlab.engines import get_engine  # noqa: E402
from cnnlab.interop import InteropError  # noqa: E402
from cnnlab.interop.keras_export import export_keras  # noqa: E402
from cnnlab.interop.keras_import import import_keras  # noqa: E402

KL = keras.layers
# Keras' torch backend converts tensors with np.array(x), which NumPy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ACTS = ["relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh", "softplus", "linear"]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def randomize(km, seed):
    """Random weights and BatchNorm statistics (variance in [0.5, 2])."""
    rng = np.random.default_rng(seed)
    for layer in km.layers:
        for w in layer.weights:
            v = rng.uniform(0.5, 2.0, w.shape) if "variance" in w.name \
                else rng.normal(0, 0.4, w.shape)
            w.assign(v.astype("float32"))
    return km


def keras_out(km, x):
    return keras.ops.convert_to_numpy(km(np.asarray(x, np.float32), training=False))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_architecture(seed):
    """A Keras Sequential over the vocabulary cnnlab reads, small shapes; returns
    (layers, final): final says what the output is ('softmax' or 'linear')."""
    rng = np.random.default_rng(seed)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    h = w = int(rng.integers(9, 14))
    c = int(rng.integers(1, 4))
    out = [keras.Input((h, w, c))]
    if rng.random() < 0.6:
        scale = (rng.uniform(0.5, 2, c) / 255).tolist() if rng.random() < 0.5 else 1 / 127.5
        out.append(KL.Rescaling(scale, offset=float(rng.uniform(-1, 0))))
    size = h
    for _ in range(int(rng.integers(2, 5))):
        kind = pick(["conv", "conv", "pad_conv", "bn", "pool", "act"])
        if kind in ("conv", "pad_conv") or size < 5:
            k, s = min(int(rng.integers(1, 4)), size), int(rng.integers(1, 3))
            pad = pick(["valid", "same"]) if kind == "conv" else "valid"
            if kind == "pad_conv":
                p = int(rng.integers(1, 3))
                out.append(KL.ZeroPadding2D(p))
                size += 2 * p
            out.append(KL.Conv2D(int(rng.integers(2, 6)), k, strides=s, padding=pad,
                                 activation=pick(ACTS), use_bias=bool(rng.random() < 0.8)))
            size = -(-size // s) if pad == "same" else (size - k) // s + 1
        elif kind == "bn":
            out.append(KL.BatchNormalization(momentum=float(rng.uniform(0.8, 0.99)),
                                             epsilon=float(pick([1e-3, 1e-5, 0.01]))))
        elif kind == "pool":
            # AveragePooling2D 'same' with uneven padding is wrong in Keras 3.15's torch
            # backend: average pools stay 'valid' here (test_avg_pool_same_by_hand below)
            if rng.random() < 0.5:
                out.append(KL.MaxPooling2D(pick([2, 3]), padding=pick(["valid", "same"])))
                size = -(-size // 2) if out[-1].padding == "same" else \
                    (size - out[-1].pool_size[0]) // out[-1].strides[0] + 1
            else:
                out.append(KL.AveragePooling2D(2))
                size //= 2
        else:
            out.append(pick([KL.ReLU(), KL.LeakyReLU(negative_slope=0.2), KL.ELU(),
                             KL.Activation(pick(ACTS)), KL.SpatialDropout2D(0.1)]))
    out.append(pick([KL.Flatten(), KL.GlobalAveragePooling2D(), KL.GlobalMaxPooling2D(),
                     KL.Reshape((-1,))]))
    if rng.random() < 0.6:
        out += [KL.Dense(int(rng.integers(3, 8)), activation=pick(ACTS)),
                pick([KL.Dropout(0.3), KL.BatchNormalization(), KL.Activation("tanh")])]
    n = int(rng.integers(2, 6))
    final = pick(["dense_softmax", "softmax_layer", "activation", "linear"])
    if final == "dense_softmax":
        out.append(KL.Dense(n, activation="softmax"))
    elif final == "softmax_layer":
        out += [KL.Dense(n), KL.Softmax()]
    elif final == "activation":
        out += [KL.Dense(n), KL.Activation("softmax")]
    else:
        out.append(KL.Dense(n))
    return out, ("linear" if final == "linear" else "softmax")


def keras_input(km, x_uint8):
    """What the Keras model is fed: raw pixels with a Rescaling layer, else pixels / 255."""
    has_rescaling = any(isinstance(layer, KL.Rescaling) for layer in km.layers)
    return x_uint8.astype(np.float32) if has_rescaling else x_uint8.astype(np.float32) / 255


def check_import(path, km, final, x, **kw):
    model, notes = import_keras(path, **kw)
    ref = keras_out(km, keras_input(km, x))
    ref = softmax(ref) if final == "linear" else ref
    xp = preprocess.apply(model.meta["preprocessing"], x)
    for engine in ("numpy", "torch"):
        got = get_engine(model, engine).predict_proba(xp)
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{path} {engine}")
    return model, notes


def save_all(km, d):
    km.save(d / "m.keras")
    km.save(d / "m.h5")
    km.save_weights(d / "m.weights.h5")
    (d / "m.json").write_text(km.to_json())
    return [(d / "m.keras", {}), (d / "m.h5", {}), (d / "m.json", {}),
            (d / "m.json", {"weights": d / "m.h5"})]   # JSON + legacy-layout weights


@pytest.mark.parametrize("seed", range(int(os.environ.get("N_ARCH", 10))))
def test_random_architectures_all_formats_both_engines(tmp_path, seed):
    layers, final = random_architecture(seed)
    km = randomize(keras.Sequential(layers), seed)
    x = np.random.default_rng(seed).integers(0, 256, (4, *km.input_shape[1:]), dtype=np.uint8)
    for path, kw in save_all(km, tmp_path):
        model, _ = check_import(path, km, final, x, **kw)
    # out again: cnnlab -> .keras -> Keras, on raw pixels (the preprocessing is its first layer)
    export_keras(model, tmp_path / "back.keras")
    back = keras.saving.load_model(tmp_path / "back.keras")
    got = keras_out(back, x.astype(np.float32))
    got = softmax(got) if model.output_activation == "linear" else got
    want = get_engine(model, "numpy").predict_proba(
        preprocess.apply(model.meta["preprocessing"], x))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo_models_through_keras_and_back(tmp_path, name):
    """A zoo model (tutorial architecture) -> .keras -> Keras runs it and saves .h5 and
    JSON + weights -> cnnlab imports them: all the same numbers."""
    m = zoo.build(name)
    m.init_weights(3)
    rng = np.random.default_rng(3)
    for k, v in m.weights.items():
        if "moving_variance" in k:
            m.weights[k] = rng.uniform(0.5, 2, v.shape).astype(np.float32)
        elif "moving_mean" in k or "beta" in k or "bias" in k:
            m.weights[k] = rng.normal(0, 0.2, v.shape).astype(np.float32)
    c = m.input_shape[-1]
    m.meta = {"class_names": [f"class{i}" for i in range(10)],
              "preprocessing": {"scale": 1 / 255, "mean": [0.4] * c, "std": [0.25] * c}}
    x = rng.integers(0, 256, (2, *m.input_shape), dtype=np.uint8)
    want = get_engine(m, "numpy").predict_proba(preprocess.apply(m.meta["preprocessing"], x))
    export_keras(m, tmp_path / "zoo.keras")
    km = keras.saving.load_model(tmp_path / "zoo.keras")
    np.testing.assert_allclose(keras_out(km, x.astype(np.float32)), want, atol=1e-5)
    km.save(tmp_path / "zoo.h5")
    back, notes = import_keras(tmp_path / "zoo.h5", classes=m.meta["class_names"])
    assert back.count_params() == m.count_params()
    assert any("Rescaling" in n for n in notes)
    np.testing.assert_allclose(back.meta["preprocessing"]["mean"], [0.4] * c, atol=1e-6)
    xp = preprocess.apply(back.meta["preprocessing"], x)
    for engine in ("numpy", "torch"):
        np.testing.assert_allclose(get_engine(back, engine).predict_proba(xp), want, atol=1e-5)
    # class names and exact statistics travel in the .keras metadata
    again, _ = import_keras(tmp_path / "zoo.keras")
    assert again.meta["class_names"] == m.meta["class_names"]
    assert again.meta["preprocessing"] == m.meta["preprocessing"]


def test_channels_first_models(tmp_path):
    for head in ([KL.Flatten()], [KL.GlobalAveragePooling2D(data_format="channels_first")],
                 [KL.Flatten(data_format="channels_first")]):
        km = randomize(keras.Sequential([
            keras.Input((2, 9, 8)),
            KL.Conv2D(3, 3, padding="same", data_format="channels_first", activation="relu"),
            KL.BatchNormalization(axis=1),
            KL.MaxPooling2D(2, data_format="channels_first"),
            KL.Conv2D(4, 2, data_format="channels_first"),
            *head, KL.Dense(5), KL.BatchNormalization(), KL.Dense(3, activation="softmax")]),
            1)
        km.save(tmp_path / "cf.keras")
        model, notes = import_keras(tmp_path / "cf.keras")
        assert model.input_shape == (9, 8, 2)
        assert any("channels_first" in n for n in notes)
        x = np.random.default_rng(0).integers(0, 256, (3, 9, 8, 2), dtype=np.uint8)
        want = keras_out(km, x.transpose(0, 3, 1, 2).astype(np.float32) / 255)
        xp = preprocess.apply(model.meta["preprocessing"], x)
        for engine in ("numpy", "torch"):
            np.testing.assert_allclose(get_engine(model, engine).predict_proba(xp), want,
                                       atol=1e-5)


def test_linear_functional_model_and_mlp(tmp_path):
    inp = keras.Input((10, 10, 1))
    h = KL.Conv2D(3, 3, activation="gelu")(inp)
    h = KL.MaxPooling2D()(h)
    h = KL.Flatten()(h)
    km = randomize(keras.Model(inp, KL.Dense(4, activation="sigmoid")(KL.Dense(6)(h))), 2)
    km.save(tmp_path / "f.keras")
    km.save(tmp_path / "f.h5")
    x = np.random.default_rng(1).integers(0, 256, (3, 10, 10, 1), dtype=np.uint8)
    for p in ("f.keras", "f.h5"):
        check_import(tmp_path / p, km, "softmax", x)
    # the MNIST MLP of the tutorials: Flatten(input_shape=(28, 28)) on a 2-D input
    mlp = randomize(keras.Sequential([keras.Input((28, 28)), KL.Flatten(),
                                      KL.Dense(8, activation="relu"), KL.Dropout(0.2),
                                      KL.Dense(10, activation="softmax")]), 4)
    mlp.save(tmp_path / "mlp.keras")
    model, _ = import_keras(tmp_path / "mlp.keras")
    assert model.input_shape == (28, 28, 1)
    x = np.random.default_rng(2).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(
        get_engine(model, "numpy").predict_proba(preprocess.apply(model.meta["preprocessing"],
                                                                  x)),
        keras_out(mlp, x[..., 0].astype(np.float32) / 255), atol=1e-5)


def test_single_sigmoid_unit(tmp_path):
    km = randomize(keras.Sequential([keras.Input((6, 6, 1)), KL.Flatten(),
                                     KL.Dense(1, activation="sigmoid")]), 5)
    km.save(tmp_path / "s.keras")
    model, _ = import_keras(tmp_path / "s.keras", classes=["no", "yes"])
    x = np.random.default_rng(5).integers(0, 256, (4, 6, 6, 1), dtype=np.uint8)
    p = keras_out(km, x.astype(np.float32) / 255)
    got = get_engine(model, "numpy").predict_proba(
        preprocess.apply(model.meta["preprocessing"], x))
    np.testing.assert_allclose(got, np.concatenate([1 - p, p], axis=1), atol=1e-5)
    assert model.meta["class_names"] == ["no", "yes"]


def test_avg_pool_same_by_hand(tmp_path):
    """AveragePooling2D 'same' with uneven padding: Keras 3.15's torch backend averages
    repeated edge cells; Keras' documented rule (and cnnlab) averages the real cells."""
    km = keras.Sequential([keras.Input((5, 5, 1)), KL.AveragePooling2D(2, padding="same"),
                           KL.Flatten(), KL.Dense(9, use_bias=False)])
    km.layers[-1].kernel.assign(np.eye(9, dtype=np.float32))
    km.save(tmp_path / "avg.keras")
    model, _ = import_keras(tmp_path / "avg.keras")
    x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    want = np.array([[np.mean(x[0, i:i + 2, j:j + 2, 0]) for i in (0, 2, 4) for j in (0, 2, 4)]])
    for engine in ("numpy", "torch"):
        np.testing.assert_allclose(get_engine(model, engine).forward(x), want, atol=1e-5)


def keras2_file(tmp_path, rng):
    """A tf.keras 2.x style .h5 written by hand: batch_input_shape, LeakyReLU 'alpha',
    Keras 2 inbound_nodes, weights named 'conv2d/kernel:0'; and the same net in Keras 3."""
    import h5py
    def node(name):
        return [[[name, 0, 0, {}]]]
    layers = [
        {"class_name": "InputLayer", "name": "input_1", "inbound_nodes": [],
         "config": {"batch_input_shape": [None, 8, 8, 1], "dtype": "float32",
                    "name": "input_1"}},
        {"class_name": "Conv2D", "name": "conv2d", "inbound_nodes": node("input_1"),
         "config": {"name": "conv2d", "trainable": True, "dtype": "float32", "filters": 3,
                    "kernel_size": [3, 3], "strides": [1, 1], "padding": "valid",
                    "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1,
                    "activation": "linear", "use_bias": True,
                    "kernel_initializer": {"class_name": "GlorotUniform",
                                           "config": {"seed": None}}}},
        {"class_name": "BatchNormalization", "name": "batch_normalization",
         "inbound_nodes": node("conv2d"),
         "config": {"name": "batch_normalization", "axis": [3], "momentum": 0.99,
                    "epsilon": 0.001, "center": True, "scale": True}},
        {"class_name": "LeakyReLU", "name": "leaky_re_lu",
         "inbound_nodes": node("batch_normalization"),
         "config": {"name": "leaky_re_lu", "alpha": 0.2}},
        {"class_name": "MaxPooling2D", "name": "max_pooling2d",
         "inbound_nodes": node("leaky_re_lu"),
         "config": {"name": "max_pooling2d", "pool_size": [2, 2], "padding": "valid",
                    "strides": [2, 2], "data_format": "channels_last"}},
        {"class_name": "Flatten", "name": "flatten", "inbound_nodes": node("max_pooling2d"),
         "config": {"name": "flatten", "data_format": "channels_last"}},
        {"class_name": "Dense", "name": "dense", "inbound_nodes": node("flatten"),
         "config": {"name": "dense", "units": 4, "activation": "softmax", "use_bias": True}},
    ]
    config = {"class_name": "Functional", "config": {
        "name": "model", "layers": layers, "input_layers": [["input_1", 0, 0]],
        "output_layers": [["dense", 0, 0]]}, "keras_version": "2.12.0",
        "backend": "tensorflow"}
    weights = {"conv2d": {"kernel": rng.normal(0, .5, (3, 3, 1, 3)), "bias": rng.normal(0, .5, 3)},
               "batch_normalization": {"gamma": rng.normal(1, .2, 3), "beta": rng.normal(0, .2, 3),
                                       "moving_mean": rng.normal(0, .2, 3),
                                       "moving_variance": rng.uniform(.5, 2, 3)},
               "dense": {"kernel": rng.normal(0, .5, (27, 4)), "bias": rng.normal(0, .5, 4)}}
    path = tmp_path / "k2.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        f.attrs["keras_version"] = b"2.12.0"
        g = f.create_group("model_weights")
        names = [ly["name"] for ly in layers]
        g.attrs["layer_names"] = np.array([n.encode() for n in names])
        for n in names:
            lg = g.create_group(n)
            ws = weights.get(n, {})
            lg.attrs["weight_names"] = np.array([f"{n}/{k}:0".encode() for k in ws])
            for k, v in ws.items():
                lg.create_dataset(f"{n}/{k}:0", data=np.asarray(v, np.float32))
    km = keras.Sequential([keras.Input((8, 8, 1)), KL.Conv2D(3, 3, name="conv2d"),
                           KL.BatchNormalization(name="batch_normalization"),
                           KL.LeakyReLU(negative_slope=0.2), KL.MaxPooling2D(), KL.Flatten(),
                           KL.Dense(4, activation="softmax", name="dense")])
    for layer in km.layers:
        for w in layer.weights:
            w.assign(np.asarray(weights[layer.name][w.name], np.float32))
    return path, km


def test_keras2_legacy_h5(tmp_path):
    path, km = keras2_file(tmp_path, np.random.default_rng(7))
    x = np.random.default_rng(8).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    check_import(path, km, "softmax", x)


def test_cnnlab_load_and_serve_read_keras_files(tmp_path):
    km = randomize(keras.Sequential([keras.Input((8, 8, 1)), KL.Conv2D(2, 3, activation="relu"),
                                     KL.Flatten(), KL.Dense(3, activation="softmax")]), 9)
    km.save(tmp_path / "m.keras")
    km.save(tmp_path / "m.h5")
    for p in ("m.keras", "m.h5"):
        model = cnnlab.load(tmp_path / p)
        assert model.count_params()[0] == km.count_params()
    pytest.importorskip("werkzeug", reason="serve needs werkzeug")
    from werkzeug.test import Client

    from cnnlab.serve.app import create_app
    client = Client(create_app(tmp_path / "m.keras"))
    card = client.get("/api/model").get_json()
    assert card["class_names"] == ["0", "1", "2"]
    assert card["input_shape"] == [8, 8, 1]


def test_refusals_name_the_layer(tmp_path):
    def save(layers, name):
        km = keras.Sequential([keras.Input((8, 8, 1)), *layers])
        km.save(tmp_path / name)
        return tmp_path / name
    cases = [
        ([KL.Conv2D(2, 3), KL.LeakyReLU(), KL.Flatten(), KL.Dense(2)],
         r"'leaky_re_lu\w*' \(LeakyReLU\): negative slope 0.3 is not supported.*0.2"),
        ([KL.Conv2D(2, 3, dilation_rate=2), KL.Flatten(), KL.Dense(2)],
         r"'conv2d\w*' \(Conv2D\): dilated"),
        ([KL.Conv2D(2, 3), KL.Rescaling([0.5, 2.0]), KL.Flatten(), KL.Dense(2)],
         r"a Rescaling after the first layer needs a single scale and offset"),
        ([KL.Conv2D(2, 3, activation="silu"), KL.Flatten(), KL.Dense(2)],
         r"\(Conv2D\): activation 'silu' is not supported; cnnlab has elu, gelu"),
        ([KL.ZeroPadding2D(((1, 0), (1, 1))), KL.Conv2D(2, 3), KL.Flatten(), KL.Dense(2)],
         r"uneven padding"),
        ([KL.ZeroPadding2D(1), KL.MaxPooling2D(), KL.Flatten(), KL.Dense(2)],
         r"ZeroPadding2D is supported only directly before a Conv2D"),
        ([KL.Conv2D(2, 3), KL.Dense(2)], r"Dense on an image tensor"),
        ([KL.UpSampling2D(), KL.Flatten(), KL.Dense(2)],
         r"'up_sampling2d\w*' \(UpSampling2D\) is not supported; cnnlab reads: InputLayer"),
    ]
    for i, (layers, pattern) in enumerate(cases):
        path = save(layers, f"r{i}.keras")
        with pytest.raises(InteropError, match=pattern):
            import_keras(path)
    inp = keras.Input((8, 8, 1))
    a, b = KL.Conv2D(2, 3)(inp), KL.Conv2D(2, 3)(inp)
    keras.Model(inp, KL.Dense(2)(KL.Flatten()(KL.Add()([a, b])))).save(tmp_path / "br.keras")
    with pytest.raises(InteropError, match=r"'add\w*' \(Add\) takes 2 inputs; .*single chain"):
        import_keras(tmp_path / "br.keras")


def test_augmentation_layers_are_left_out(tmp_path):
    """The image-classification tutorial's model: a data_augmentation Sequential, then
    Rescaling, convolutions and a logits head."""
    augment = keras.Sequential([KL.RandomFlip("horizontal"), KL.RandomRotation(0.1),
                                KL.RandomZoom(0.1)], name="data_augmentation")
    km = randomize(keras.Sequential([
        keras.Input((12, 12, 3)), augment, KL.Rescaling(1 / 255),
        KL.Conv2D(4, 3, padding="same", activation="relu"), KL.MaxPooling2D(),
        KL.GaussianNoise(0.1), KL.Dropout(0.2), KL.Flatten(), KL.Dense(8, activation="relu"),
        KL.Dense(5)]), 11)
    x = np.random.default_rng(3).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    for path, kw in save_all(km, tmp_path)[:2]:
        model, notes = check_import(path, km, "linear", x, **kw)
        assert [ly.type for ly in model.layers] == ["Conv2D", "MaxPool2D", "Dropout", "Flatten",
                                                    "Dense", "Dense"]
        assert any("data_augmentation: Sequential left out" in n for n in notes)
        assert model.meta["preprocessing"]["std"] == [1.0] * 3

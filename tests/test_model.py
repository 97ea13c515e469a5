"""The model description: shapes, parameter counts, names, JSON, errors."""
import json
import re
import math

import numpy as np

import pytest

from cnnlab import zoo
from cnnlab.layers import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten,
                           GlobalAvgPool2D, Input, MaxPool2D, ModelError, pad_amounts)
from cnnlab import Sequential


def test_tutorial_parameter_counts_match_keras():
    assert zoo.build("lenet").count_params() == (8790, 8790, 0)
    assert zoo.build("cifar-basic").count_params()[0] == 477_994
    # keras.io "Simple MNIST convnet" summary: 34,826
    m = Sequential([Input((28, 28, 1)), Conv2D(32, 3, activation="relu"), MaxPool2D(),
                    Conv2D(64, 3, activation="relu"), MaxPool2D(), Flatten(), Dropout(0.5),
                    Dense(10, activation="softmax")])
    assert m.count_params() == (34_826, 34_826, 0)
    assert [r["output_shape"] for r in m.summary_rows()][:4] == [
        [None, 26, 26, 32], [None, 13, 13, 32], [None, 11, 11, 64], [None, 5, 5, 64]]
    # Keras' cifar10_cnn example prints 1,250,858 parameters
    assert zoo.build("keras-cifar10").count_params()[0] == 1_250_858


def test_batchnorm_counts_moving_stats_as_non_trainable():
    m = Sequential([Input((8, 8, 3)), Conv2D(4, 3), BatchNorm(), Flatten(), Dense(2)])
    total, trainable, non = m.count_params()
    assert non == 2 * 4 and trainable == (3 * 3 * 3 * 4 + 4) + 2 * 4 + (6 * 6 * 4 * 2 + 2)
    assert total == trainable + non


def test_every_zoo_model_builds_and_counts_by_formula():
    for name in zoo.names():
        m = zoo.build(name)
        expected = 0
        for layer, (i, o) in zip(m.layers, m.layer_shapes):
            if isinstance(layer, Conv2D):
                expected += math.prod(layer.kernel_size) * i[-1] * layer.filters + \
                    layer.filters * layer.use_bias
            elif isinstance(layer, Dense):
                expected += i[0] * layer.units + layer.units * layer.use_bias
            elif isinstance(layer, BatchNorm):
                expected += (2 + layer.center + layer.scale) * i[-1]
        assert m.count_params()[0] == expected, name
        assert m.output_shape == (10,)


@pytest.mark.parametrize("n,k,s,padding,expected", [
    (28, 3, 1, "valid", 26), (28, 3, 1, "same", 28), (28, 3, 2, "same", 14),
    (27, 3, 2, "same", 14), (28, 5, 2, "same", 14), (28, 3, 1, "full", 30),
    (28, 5, 1, "full", 32), (28, 3, 2, "valid", 13), (32, 5, 1, 2, 32), (7, 2, 2, "valid", 3),
])
def test_output_size_formula(n, k, s, padding, expected):
    m = Sequential([Input((n, n, 1)), Conv2D(1, k, strides=s, padding=padding)])
    assert m.output_shape == (expected, expected, 1)
    before, after = pad_amounts(n, k, s, padding)
    assert m.output_shape[0] == (n + before + after - k) // s + 1


def test_keras_same_padding_puts_the_odd_pixel_bottom_right():
    assert pad_amounts(28, 3, 2, "same") == (0, 1)   # total = 13*2 + 3 - 28 = 1
    assert pad_amounts(28, 3, 1, "same") == (1, 1)
    assert pad_amounts(28, 4, 1, "same") == (1, 2)
    assert pad_amounts(5, 1, 2, "same") == (0, 0)
    assert pad_amounts(10, 3, 1, "full") == (2, 2)


def test_explicit_asymmetric_pair_padding():
    m = Sequential([Input((10, 12, 1)), Conv2D(2, 3, padding=(1, 0))])
    assert m.output_shape == (10, 10, 2)


def test_clear_error_names_layer_and_numbers():
    with pytest.raises(ModelError, match=r"layer 5 Conv2D: input 2x2 is smaller than kernel 3x3"):
        Sequential([Input((14, 14, 1)), Conv2D(4, 3), MaxPool2D(), Conv2D(4, 3), MaxPool2D(),
                    Conv2D(4, 3)])
    with pytest.raises(ModelError, match="Dense: expects a flat input.*Flatten"):
        Sequential([Input((8, 8, 1)), Dense(3)])
    with pytest.raises(ModelError, match="unknown activation 'rellu'; allowed: linear, relu"):
        Conv2D(3, 3, activation="rellu")
    with pytest.raises(ModelError, match="unknown padding 'sam'; allowed: valid, same, full"):
        Conv2D(3, 3, padding="sam")
    with pytest.raises(ModelError, match="Dropout rate must be in"):
        Dropout(1.5)
    with pytest.raises(ModelError, match="needs an input shape"):
        Sequential([Conv2D(3, 3)])
    with pytest.raises(ModelError, match="two layers are named 'a'"):
        Sequential([Input((8, 8, 1)), Conv2D(2, 3, name="a"), Conv2D(2, 3, name="a")])


def test_json_round_trip_is_exact():
    for name in zoo.names():
        m = zoo.build(name)
        text = m.to_json()
        again = Sequential.from_json(text)
        assert again.get_config() == m.get_config()
        assert again.to_json() == text
        assert [l.name for l in again.layers] == [l.name for l in m.layers]


def test_json_errors_list_allowed_values():
    cfg = {"input_shape": [8, 8, 1], "layers": [{"type": "Conv3D", "config": {}}]}
    with pytest.raises(ModelError, match=r"layer 1 unknown layer type 'Conv3D'; did you mean Conv2D\? \(allowed: Input, Conv2D"):
        Sequential.from_config(cfg)
    cfg = {"input_shape": [8, 8, 1], "layers": [{"type": "Conv2D", "config": {"filterz": 2}}]}
    with pytest.raises(ModelError, match="Conv2D: unknown argument 'filterz'; did you mean filters"):
        Sequential.from_config(cfg)
    with pytest.raises(ModelError, match="not valid JSON"):
        Sequential.from_json("{nope")


def test_keras_class_names_are_accepted_in_json():
    cfg = {"input_shape": [28, 28, 1], "layers": [
        {"type": "Conv2D", "config": {"filters": 2, "kernel_size": 3}},
        {"type": "MaxPooling2D"}, {"type": "BatchNormalization"},
        {"type": "GlobalAveragePooling2D"}, {"type": "Dense", "config": {"units": 3}}]}
    m = Sequential.from_config(cfg)
    assert [l.type for l in m.layers] == ["Conv2D", "MaxPool2D", "BatchNorm", "GlobalAvgPool2D",
                                          "Dense"]


def test_auto_names_follow_keras():
    m = zoo.build("cifar-basic")
    names = [l.name for l in m.layers]
    assert names[:5] == ["conv2d", "activation", "conv2d_1", "activation_1", "max_pooling2d"]
    assert list(m.weights)[:2] == ["conv2d.kernel", "conv2d.bias"]
    assert m.weights["conv2d.kernel"].shape == (3, 3, 3, 32)
    assert m.weights["dense.kernel"].shape == (1600, 256)


def test_glorot_uniform_init_is_seeded_and_bounded():
    m = zoo.build("lenet")
    k = m.weights["conv2d_1.kernel"]
    limit = math.sqrt(6 / (9 * 6 + 9 * 16))
    assert abs(k).max() <= limit and abs(k).max() > 0.9 * limit
    assert (m.weights["conv2d.bias"] == 0).all()
    w0 = m.init_weights(1).weights["dense.kernel"].copy()
    assert (m.init_weights(1).weights["dense.kernel"] == w0).all()
    assert not (m.init_weights(2).weights["dense.kernel"] == w0).all()


def test_final_activation_is_found():
    assert zoo.build("lenet").output_activation == "softmax"
    assert zoo.build("cifar-basic").output_activation == "softmax"   # Activation layer
    m = Sequential([Input((4, 4, 1)), Flatten(), Dense(1, activation="sigmoid")])
    assert m.output_activation == "sigmoid" and m.num_classes == 2
    m = Sequential([Input((4, 4, 1)), Flatten(), Dense(3)])
    assert m.output_activation == "linear" and m.final_activation_index is None


def test_summary_text_and_json():
    m = zoo.build("lenet")
    lines = []
    assert m.summary(print_fn=lines.append) is None   # printed once, as Keras does
    text = "\n".join(lines)
    assert "conv2d (Conv2D)" in text and "(None, 14, 14, 6)" in text
    assert "Total params: 8,790" in text and "Non-trainable params: 0" in text
    d = m.summary_dict()
    assert d["layers"][0] == {"name": "conv2d", "type": "Conv2D",
                              "output_shape": [None, 28, 28, 6], "params": 60}
    json.dumps(d)


def test_avgpool_and_global_pool_shapes():
    m = Sequential([Input((9, 9, 3)), AvgPool2D(2, padding="same"), GlobalAvgPool2D()])
    assert m.layer_shapes[0][1] == (5, 5, 3) and m.output_shape == (3,)
    m = Sequential([Input((9, 9, 3)), MaxPool2D(3, strides=2), Activation("tanh")])
    assert m.output_shape == (4, 4, 3)


def test_save_refuses_foreign_extensions_and_writes_keras_files(tmp_path):
    m = zoo.build("lenet")
    with pytest.raises(ModelError, match=r"x\.h5: cnnlab writes \.safetensors"):
        m.save(tmp_path / "x.h5")
    assert not list(tmp_path.iterdir())
    assert m.save(tmp_path / "x").name == "x.safetensors"
    pytest.importorskip("h5py")
    path = m.save(tmp_path / "x.keras")
    import cnnlab
    again = cnnlab.load(path)
    x = np.random.default_rng(0).random((2, 28, 28, 1))
    np.testing.assert_allclose(again.predict(x, engine="numpy"), m.predict(x, engine="numpy"),
                               atol=1e-6)


def test_json_descriptions_flat_nested_and_keras_shaped():
    nested = {"input_shape": [28, 28, 1], "layers": [
        {"type": "Conv2D", "name": "c", "config": {"filters": 4, "kernel_size": 3}},
        {"type": "Flatten"}, {"type": "Dense", "config": {"units": 10, "activation": "softmax"}}]}
    flat = {"input_shape": [28, 28, 1], "layers": [
        {"type": "Conv2D", "name": "c", "filters": 4, "kernel_size": 3},
        {"type": "Flatten"}, {"type": "Dense", "units": 10, "activation": "softmax"}]}
    a, b = Sequential.from_config(nested), Sequential.from_config(flat)
    assert a.get_config() == b.get_config() and a.count_params()[0] == 40 + 2704 * 10 + 10
    for layer, message in [({"type": "Conv2D", "filters": 4, "kernel": 3},
                            "Conv2D: unknown argument 'kernel'; did you mean kernel_size?"),
                           ({"type": "Conv2D", "config": {"kernel_size": 3}},
                            "Conv2D: missing required argument(s) 'filters'"),
                           ({"type": "Dense2", "units": 3}, "did you mean Dense?"),
                           ({"type": ["Dense"]}, "a layer 'type' is a name"),
                           ({"type": "Dense", "units": "x" * 10_000}, "units")]:
        with pytest.raises(ModelError, match=re.escape(message)) as e:
            Sequential.from_config({"input_shape": [4], "layers": [layer]})
        assert len(str(e.value)) < 400
    m = Sequential.from_config({"input_shape": [4], "layers": [
        {"type": "Activation", "config": {"activation": "relu", "name": "act"}}]})
    assert m.layers[0].name == "act"


def test_keras_get_config_builds_the_same_model():
    keras = pytest.importorskip("keras")
    k = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(6, 3, activation="relu"),
                          keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                          keras.layers.Dense(10, activation="softmax")])
    m = Sequential.from_json(k.to_json())
    assert m.count_params()[0] == k.count_params()
    assert [lay.type for lay in m.layers] == ["Conv2D", "MaxPool2D", "Flatten", "Dense"]
    assert Sequential.from_config(k.get_config()).get_config() == m.get_config()

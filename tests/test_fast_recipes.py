"""Fast recipes: automatic precision, Keras layer options, training tricks, the airbench net."""
import json

import numpy as np
import pytest

from cnnlab import hardware


# precision chosen by the hardware ------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    ({"sse4_2", "avx2", "avx512f"}, "fp32"),          # AVX-512 without BF16: emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"amx_tile", "amx_bf16"}, "bf16"),
    (set(), "fp32"),
])
def test_auto_precision_picks_bf16_only_where_native(flags, expected):
    choice = hardware.choose_precision("cpu", frozenset(flags))
    assert choice.precision == expected
    assert ("has native bf16" in choice.reason) == (expected == "bf16")


def test_auto_precision_on_cuda_follows_bf16_support():
    assert hardware.choose_precision("cuda", cuda_bf16=True).precision == "bf16"
    assert hardware.choose_precision("cuda", frozenset({"amx_bf16"}),
                                     cuda_bf16=False).precision == "fp32"


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16\n\n"
                 "processor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(f) == {"fpu", "avx2", "amx_bf16"}
    assert hardware.cpu_model(f) == "Test CPU"
    assert hardware.cpu_flags(tmp_path / "absent") == frozenset()


def test_auto_precision_is_recorded_in_config_json(tmp_path):
    from cnnlab import Sequential
    from cnnlab.layers import Dense, Flatten, Input
    from cnnlab.training import fit
    x = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    y = np.arange(16) % 2
    model = Sequential([Input((4, 4, 1)), Flatten(), Dense(2, activation="softmax")])
    fit(model, (x, y), epochs=1, batch_size=8, precision="auto", engine="torch",
        device="cpu", out=str(tmp_path / "run"), verbose=0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = hardware.auto_precision("cpu")
    assert config["train"]["precision"] == "auto"
    assert config["precision"] == {"chosen": expected.precision, "reason": expected.reason}


# Keras layer options: trainable, BatchNorm center/scale, use_bias, Rescaling ------------
from cnnlab import Sequential  # noqa: E402
from cnnlab import layers as L  # noqa: E402
from cnnlab.engines.numpy.engine import NumpyEngine  # noqa: E402


def options_model():
    """Every new option once: a frozen convolution, BatchNorm without gamma / without beta,
    Dense without bias, a Rescaling."""
    return Sequential([L.Input((6, 6, 3)), L.Conv2D(4, 3, trainable=False),
                       L.BatchNorm(scale=False, momentum=0.6, epsilon=1e-5),
                       L.Activation("gelu"), L.Conv2D(3, 2, use_bias=False),
                       L.BatchNorm(center=False), L.Flatten(),
                       L.Dense(5, use_bias=False), L.Rescaling(1 / 9, offset=0.25),
                       L.Activation("softmax")])


def random_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    w = {k: rng.normal(1.0 if k.endswith("gamma") else 0.0, 0.5, s)
         for k, s in model.param_shapes().items()}
    for k in w:
        if k.endswith("moving_variance"):
            w[k] = rng.uniform(0.5, 2.0, w[k].shape)
    model.set_weights(w)
    return model


def test_parameter_counts_by_hand():
    model = options_model()
    # conv 3*3*3*4 + 4 = 112, frozen; BN(scale=False) on 4: beta 4 + moving 8;
    # conv 2*2*4*3 = 48; BN(center=False) on 3: gamma 3 + moving 6; Dense 3*3*3*5 = 135
    assert model.count_params() == (112 + 12 + 48 + 9 + 135, 4 + 48 + 3 + 135, 112 + 8 + 6)
    assert set(model.param_shapes()) == {
        "conv2d.kernel", "conv2d.bias", "batch_normalization.beta",
        "batch_normalization.moving_mean", "batch_normalization.moving_variance",
        "conv2d_1.kernel", "batch_normalization_1.gamma", "batch_normalization_1.moving_mean",
        "batch_normalization_1.moving_variance", "dense.kernel"}
    assert model.trainable_names() == ["batch_normalization.beta", "conv2d_1.kernel",
                                       "batch_normalization_1.gamma", "dense.kernel"]
    rows = {r["name"]: r["params"] for r in model.summary_rows()}
    assert rows["rescaling"] == 0 and rows["conv2d"] == 112


def test_parameter_counts_as_keras_prints_them():
    import os
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    kl = keras.layers
    km = keras.Sequential([keras.Input((6, 6, 3)), kl.Conv2D(4, 3, trainable=False),
                           kl.BatchNormalization(scale=False), kl.Activation("gelu"),
                           kl.Conv2D(3, 2, use_bias=False), kl.BatchNormalization(center=False),
                           kl.Flatten(), kl.Dense(5, use_bias=False),
                           kl.Rescaling(1 / 9, offset=0.25), kl.Activation("softmax")])
    trainable = sum(int(np.prod(w.shape)) for w in km.trainable_weights)
    non = sum(int(np.prod(w.shape)) for w in km.non_trainable_weights)
    assert options_model().count_params() == (km.count_params(), trainable, non)


def test_options_round_trip_through_json():
    model = options_model()
    config = json.loads(model.to_json())
    assert config["layers"][0]["trainable"] is False and "trainable" not in config["layers"][1]
    assert config["layers"][1]["config"]["scale"] is False
    assert config["layers"][7]["config"] == {"scale": 1 / 9, "offset": 0.25}
    again = Sequential.from_json(model.to_json())
    assert [a == b for a, b in zip(again.layers, model.layers)] == [True] * len(model.layers)
    assert again.count_params() == model.count_params()
    # a plain BatchNorm's config is as before the options existed
    assert L.BatchNorm().get_config() == {"momentum": 0.99, "epsilon": 1e-3}
    with pytest.raises(L.ModelError, match="trainable must be true or false, got 'no'"):
        L.from_config({"type": "Dense", "config": {"units": 2}, "trainable": "no"})
    with pytest.raises(L.ModelError, match="BatchNorm scale must be true or false"):
        L.BatchNorm(scale=0)
    with pytest.raises(L.ModelError, match="Rescaling scale must be a finite number"):
        L.Rescaling(float("nan"))


def test_batchnorm_without_gamma_and_beta_and_rescaling_by_hand():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
    model = Sequential([L.Input((2,)), L.BatchNorm(center=False, scale=False, epsilon=1e-3,
                                                   momentum=0.5),
                        L.Rescaling(2.0, offset=-1.0)])
    model.set_weights({"batch_normalization.moving_mean": np.array([1.0, 2.0]),
                       "batch_normalization.moving_variance": np.array([4.0, 0.25])})
    # inference: (x - moving_mean) / sqrt(moving_var + eps) * 2 - 1
    expected = (x - [1.0, 2.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-3) * 2 - 1
    for engine in engines_f64(model):
        np.testing.assert_allclose(engine.forward(x), expected, rtol=1e-6)
    # training: batch mean (3, 12), biased var (8/3, 8)
    ne = NumpyEngine(model, dtype=np.float64)
    expected = (x - [3.0, 12.0]) / np.sqrt(np.array([8 / 3, 8.0]) + 1e-3) * 2 - 1
    np.testing.assert_allclose(ne.forward(x, training=True), expected, rtol=1e-6)
    # moving = 0.5 old + 0.5 batch (unbiased var: 4, 12)
    np.testing.assert_allclose(model.weights["batch_normalization.moving_variance"],
                               [0.5 * 4 + 0.5 * 4, 0.5 * 0.25 + 0.5 * 12], rtol=1e-6)


def engines_f64(model):
    from cnnlab.engines.torch.engine import TorchEngine
    return [NumpyEngine(model, dtype=np.float64), TorchEngine(model, device="cpu",
                                                              dtype=np.float64)]


def test_both_engines_agree_on_the_options_in_float64():
    from test_engine_parity import check_inference, check_training
    model = random_weights(options_model())
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 6, 3))
    check_inference(model, x, rng)
    check_training(model, x, rng, "crossentropy", 0.1)


def test_gradients_of_the_options_equal_numerical_ones():
    model = random_weights(options_model(), seed=1)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 6, 6, 3)), np.array([0, 3, 4])
    ne = NumpyEngine(model, dtype=np.float64)
    model.weights = {k: v.astype(np.float64) for k, v in model.weights.items()}
    saved = {k: v.copy() for k, v in model.weights.items()}

    def loss_grads():  # training mode; the moving statistics are put back after each call
        out = ne.loss_and_grads(x, y)
        for k in saved:
            if "moving" in k:
                model.weights[k][...] = saved[k]
        return out

    def loss():
        return loss_grads()[0]
    grads = loss_grads()[2]
    assert set(grads) == set(model.trainable_names())   # none for the frozen conv
    for key, g in grads.items():
        w, num = model.weights[key], np.zeros_like(grads[key])
        for idx in list(np.ndindex(w.shape))[:12]:
            old = w[idx]
            w[idx] = old + 1e-6
            fp = loss()
            w[idx] = old - 1e-6
            fm = loss()
            w[idx] = old
            num[idx] = (fp - fm) / 2e-6
            np.testing.assert_allclose(g[idx], num[idx], rtol=1e-5, atol=1e-8, err_msg=key)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_training_leaves_frozen_layers_alone(engine):
    from cnnlab.training import fit
    model = options_model()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (24, 6, 6, 3), dtype=np.uint8), np.arange(24) % 5
    model.init_weights(0)
    before = {k: v.copy() for k, v in model.weights.items()}
    fit(model, (x, y), epochs=1, batch_size=8, engine=engine, optimizer="sgd", lr=0.1,
        momentum=0.9, weight_decay=0.1, verbose=0, device="cpu")
    for key in before:
        changed = not np.array_equal(before[key], model.weights[key])
        assert changed == (not key.startswith("conv2d.")), key

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
    assert choice.reason.startswith("auto: native bf16" if expected == "bf16" else
                                    "auto: no native bf16")


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


def test_a_resumed_run_keeps_the_precision_auto_chose(tmp_path, monkeypatch):
    from cnnlab import Sequential
    from cnnlab.layers import Dense, Flatten, Input
    from cnnlab.training import fit
    from cnnlab.training.run import CHECKPOINT, read_checkpoint
    x = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    model = Sequential([Input((4, 4, 1)), Flatten(), Dense(2, activation="softmax")])
    monkeypatch.setenv(hardware.PIN_VARIABLE, "bf16")
    fit(model, (x, np.arange(16) % 2), epochs=1, batch_size=8, engine="torch", device="cpu",
        out=str(tmp_path / "run"), verbose=0)
    _, meta = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert meta["trainer"]["config"]["precision"] == "bf16"   # not "auto": another machine
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["precision"] == "auto"              # what was asked, and
    assert config["precision"]["chosen"] == "bf16"             # what it meant here


def test_auto_precision_is_recorded_in_config_json(tmp_path, monkeypatch):
    monkeypatch.delenv(hardware.PIN_VARIABLE)   # the machine's own choice
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


def test_the_default_precision_is_auto_and_can_be_pinned(monkeypatch):
    from cnnlab.training.config import TrainConfig
    from cnnlab.engines.torch.backend import precision_of
    assert TrainConfig().precision == "auto"
    for pin in ("fp32", "bf16"):
        monkeypatch.setenv(hardware.PIN_VARIABLE, pin)
        choice = precision_of("auto", "cpu")
        assert (choice.precision, choice.reason) == (pin, "auto: set by CNNLAB_PRECISION")
        assert precision_of("fp32", "cpu").precision == "fp32"   # asked for: kept
    monkeypatch.setenv(hardware.PIN_VARIABLE, "fp8")   # not a pin: the machine decides
    assert precision_of("auto", "cpu") == hardware.choose_precision("cpu", hardware.cpu_flags())


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
    from parity import check_inference, check_training
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


# training options ----------------------------------------------------------------------
from cnnlab.augment import alternating_flip, tta_logits  # noqa: E402
from cnnlab.training import TrainConfig, TrainingError, fit, resume_run, scheduled_lr  # noqa: E402
from cnnlab.training.config import param_groups, sgd_scales  # noqa: E402
from cnnlab.training import tricks  # noqa: E402


def test_whitening_init_gives_white_patches():
    rng = np.random.default_rng(0)
    # correlated colour images: a smooth random field plus a shared colour cast
    base = rng.normal(size=(60, 9, 9, 1)).cumsum(1).cumsum(2)
    x = base * [1.0, 0.8, 0.5] + rng.normal(size=(60, 9, 9, 3)) * 0.3
    x = np.clip(128 + 12 * x, 0, 255).astype(np.uint8)
    model = Sequential([L.Input((9, 9, 3)), L.Conv2D(24, 2, use_bias=False, trainable=False),
                        L.Flatten(), L.Dense(2)])
    prep = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.1] * 3}
    tricks.whiten_init(model, x, prep, images=60, eps=0.0)
    from cnnlab.preprocess import apply
    z = NumpyEngine(model, dtype=np.float64).activations(apply(prep, x))[0][1].reshape(-1, 24)
    second = z[:, :12].T @ z[:, :12] / len(z)
    np.testing.assert_allclose(second, np.eye(12), atol=2e-3)
    np.testing.assert_array_equal(z[:, 12:], -z[:, :12])
    # raw patches are far from white
    raw = tricks.patches(apply(prep, x).astype(np.float64), (2, 2))
    assert np.abs(raw.T @ raw / len(raw) - np.eye(12)).max() > 1


def test_whitening_init_refuses_a_first_layer_it_cannot_whiten():
    model = Sequential([L.Input((9, 9, 3)), L.Conv2D(10, 2), L.Flatten(), L.Dense(2)])
    x = np.zeros((4, 9, 9, 3), np.uint8)
    with pytest.raises(TrainingError, match="needs 12 or 24 filters"):
        tricks.whiten_init(model, x, {"scale": 1 / 255, "mean": [0] * 3, "std": [1] * 3})


def test_dirac_init_passes_the_first_channels_through():
    model = Sequential([L.Input((5, 5, 2)), L.Conv2D(3, 3, padding="same"),
                        L.Conv2D(2, 3, padding="same", use_bias=False), L.Flatten(),
                        L.Dense(2)])
    assert tricks.dirac_init(model) == ["conv2d.kernel", "conv2d_1.kernel"]
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 2))
    out = NumpyEngine(model, dtype=np.float64).activations(x)
    np.testing.assert_allclose(out[0][1][..., :2], x, atol=1e-12)   # filters 0, 1: identity
    assert np.abs(out[0][1][..., 2]).max() > 0                     # filter 2 kept its init
    np.testing.assert_allclose(out[1][1], x, atol=1e-12)


def test_alternating_flip_flips_every_image_once_per_two_epochs():
    n = 1000
    masks = [alternating_flip(7, e, np.arange(n), n) for e in range(6)]
    for a, b in zip(masks, masks[1:]):
        assert (a ^ b).all()                     # consecutive epochs: exactly one flipped
    assert 400 < masks[0].sum() < 600
    idx = np.random.default_rng(0).permutation(n)[:50]
    np.testing.assert_array_equal(alternating_flip(7, 3, idx, n), masks[3][idx])
    assert not np.array_equal(alternating_flip(8, 0, np.arange(n), n), masks[0])


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_the_loop_feeds_alternating_flips_to_the_backend(engine, monkeypatch):
    from cnnlab.training import loop
    seen = []
    real = loop.make_backend

    def spy(*a, **k):
        be = real(*a, **k)
        step = be.train_step

        def train_step(idx, seed, flip=None):
            seen.append((be_epoch[0], idx.copy(), flip.copy()))
            return step(idx, seed, flip=flip)
        be.train_step = train_step
        return be
    be_epoch = [0]
    monkeypatch.setattr(loop, "make_backend", spy)
    x = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
    y = np.arange(40) % 2
    model = Sequential([L.Input((4, 4, 1)), L.Flatten(), L.Dense(2, activation="softmax")])
    cfg = dict(epochs=2, batch_size=16, engine=engine, device="cpu", verbose=0,
               augment={"flip": "alternate"})
    fit(model, (x, y), **cfg)
    assert len(seen) == 6
    flipped = np.zeros(40, int)
    for _, idx, flip in seen:
        flipped[idx[flip]] += 1
    assert (flipped == 1).all()


def test_alternating_flip_mirrors_the_training_images():
    from cnnlab.augment import flip_images
    import torch
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 1)).astype(np.float32)
    mask = np.array([True, False, True])
    out = flip_images(x, mask)
    np.testing.assert_array_equal(out[0], x[0, :, ::-1])
    np.testing.assert_array_equal(out[1], x[1])
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(flip_images(t, mask).permute(0, 2, 3, 1).numpy(), out)


class FakeBackend:
    """Weights that a 'step' moves by a known amount."""
    def __init__(self, w):
        self.w = {k: v.copy() for k, v in w.items()}

    def export_weights(self):
        return {k: v.copy() for k, v in self.w.items()}

    def set_weights(self, weights):
        for k, v in weights.items():
            self.w[k][...] = v


def test_lookahead_equals_its_formula_on_a_toy_problem():
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=3).astype(np.float32), "b": np.float32([2.0])}
    steps = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in w0.items()}
             for _ in range(13)]
    be, la = FakeBackend(w0), tricks.Lookahead(every=5, decay=0.8, power=2)
    la.start(be.export_weights())
    for t, d in enumerate(steps, start=1):
        for k in d:
            be.w[k] += d[k]
        la.after_step(be, t, len(steps))
    # by hand, in float64: the average moves at steps 5 and 10; w = ema there and at the end
    w = {k: v.astype(np.float64) for k, v in w0.items()}
    ema = {k: v.copy() for k, v in w.items()}
    for t, d in enumerate(steps, start=1):
        w = {k: w[k] + d[k] for k in w}
        if t % 5 == 0:
            a = 0.8 * (t / 13) ** 2
            ema = {k: a * ema[k] + (1 - a) * w[k] for k in w}
            w = {k: v.copy() for k, v in ema.items()}
    for k in w0:
        np.testing.assert_allclose(be.w[k], ema[k], rtol=1e-5)   # the last step: w <- ema
        np.testing.assert_allclose(la.ema[k], ema[k], rtol=1e-5)


def test_tta_of_a_flip_symmetric_model_equals_plain_evaluation():
    from cnnlab.evaluate import evaluate
    model = Sequential([L.Input((6, 6, 3)), L.Conv2D(4, 3, activation="relu"),
                        L.GlobalAvgPool2D(), L.Dense(3, activation="softmax")])
    model.init_weights(2)
    k = model.weights["conv2d.kernel"]
    k[...] = (k + k[:, ::-1]) / 2            # mirror-symmetric filters: f(mirror x) = f(x)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8), rng.integers(0, 3, 30)
    plain = evaluate(model, (x, y), engine="numpy")
    flip = evaluate(model, (x, y), engine="numpy", tta=1)
    assert flip["accuracy"] == plain["accuracy"] and flip["tta"] == 1
    assert flip["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    np.testing.assert_array_equal(flip["confusion_matrix"], plain["confusion_matrix"])


def test_tta_levels_by_hand():
    f = lambda v: v.reshape(len(v), -1)[:, :3] * np.arange(1, 4)   # noqa: E731  (not symmetric)
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 1))
    mirror = x[:, :, ::-1]
    np.testing.assert_allclose(tta_logits(f, x, 1), (f(x) + f(mirror)) / 2)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    t1 = lambda v: (f(v) + f(v[:, :, ::-1])) / 2   # noqa: E731
    np.testing.assert_allclose(tta_logits(f, x, 2),
                               t1(x) / 2 + (t1(p[:, :3, :3]) + t1(p[:, 2:, 2:])) / 4)
    with pytest.raises(ValueError, match="TTA level must be one of"):
        tta_logits(f, x, 3)


def test_decoupled_sgd_hyperparameters_follow_the_formula():
    cfg = TrainConfig(optimizer="sgd", lr=11.5, momentum=0.85, nesterov=True,
                      weight_decay=0.0153, batch_size=1024, decoupled=True,
                      loss_reduction="sum").check()
    k = 1024 * (1 + 1 / 0.15)
    lr_factor, wd_factor = sgd_scales(cfg)
    assert lr_factor == pytest.approx(1 / k)
    assert 11.5 * lr_factor * 0.0153 * wd_factor == pytest.approx(0.0153 * 1024 / k)
    assert scheduled_lr(cfg, 0, 10, 0) == pytest.approx(11.5 / k)
    # the mean loss has 1/B of the sum's gradient: its lr is B times larger
    mean = TrainConfig(**{**cfg.__dict__, "loss_reduction": "mean"}).check()
    assert scheduled_lr(mean, 0, 10, 0) == pytest.approx(11.5 * 1024 / k)
    with pytest.raises(TrainingError, match="decoupled hyperparameters are for the sgd"):
        TrainConfig(optimizer="adam", decoupled=True).check()


def test_bias_groups_scale_the_lr_and_keep_or_drop_the_decay():
    cfg = TrainConfig(optimizer="sgd", momentum=0.9, weight_decay=0.01, bias_lr=64).check()
    names = ["c.kernel", "c.bias", "bn.beta", "bn.gamma", "d.kernel"]
    (others, s1, o1), (biases, s2, o2) = param_groups(cfg, names)
    assert (others, biases) == (["c.kernel", "d.kernel"], ["c.bias", "bn.beta", "bn.gamma"])
    assert (s1, s2, o1["weight_decay"], o2["weight_decay"]) == (1.0, 64, 0.01, 0.01 / 64)
    cfg = TrainConfig(optimizer="sgd", weight_decay=0.01, bias_decay=False).check()
    assert param_groups(cfg, names)[1][1:] == (1.0, {"momentum": 0.0, "nesterov": False,
                                                     "weight_decay": 0.0})
    assert len(param_groups(TrainConfig().check(), names)) == 1


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_one_sgd_step_with_bias_groups_by_hand(engine):
    """w <- w - lr * s * (g + wd_s * w), per group; the gradient of the summed loss."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 2, 2, 1), dtype=np.uint8), np.arange(8) % 2
    model = Sequential([L.Input((2, 2, 1)), L.Flatten(), L.Dense(2), L.BatchNorm(),
                        L.Activation("softmax")])
    model.init_weights(0)
    w0 = {k: v.copy() for k, v in model.weights.items()}
    probe = model.copy()
    from cnnlab.preprocess import apply, make_preprocessing
    xb = apply(make_preprocessing(channels=1), x)
    _, _, g = NumpyEngine(probe, dtype=np.float64).loss_and_grads(xb, y, reduction="sum")
    fit(model, (x, y), epochs=1, batch_size=8, engine=engine, device="cpu", optimizer="sgd",
        lr=0.01, weight_decay=0.1, bias_lr=4, bias_decay=False, loss_reduction="sum",
        verbose=0)
    for key, grad in g.items():
        s, wd = (4, 0.0) if key.rsplit(".")[1] in ("bias", "beta", "gamma") else (1, 0.1)
        expected = w0[key] - 0.01 * s * (grad + wd * w0[key])
        np.testing.assert_allclose(model.weights[key], expected, rtol=1e-4, atol=1e-6,
                                   err_msg=key)


def test_warmup_linear_schedule():
    cfg = TrainConfig(lr=2.0, schedule="warmup_linear", warmup=0.2, lr_start=0.2,
                      lr_end=0.05).check()
    lrs = [scheduled_lr(cfg, s, 100, 0) for s in (0, 10, 20, 60, 100)]
    np.testing.assert_allclose(lrs, [0.4, 0.4 + 1.6 * 0.5, 2.0, 2.0 * (1 - 0.95 * 0.5), 0.1])


def test_summed_loss_scales_the_gradients_by_the_batch_size():
    model = random_weights(options_model())
    x = np.random.default_rng(1).normal(size=(5, 6, 6, 3))
    y = np.arange(5)
    mean = NumpyEngine(model.copy(), dtype=np.float64).loss_and_grads(x, y)
    summed = NumpyEngine(model.copy(), dtype=np.float64).loss_and_grads(x, y, reduction="sum")
    assert summed[0] == mean[0]              # the reported loss stays the mean
    for k in mean[2]:
        np.testing.assert_allclose(summed[2][k], 5 * mean[2][k], rtol=1e-12)


def tiny_airbench():
    """The airbench shape in miniature: frozen whitening conv, GELU, one conv group."""
    return Sequential([L.Input((8, 8, 3)), L.Conv2D(24, 2, use_bias=False, trainable=False),
                       L.Activation("gelu"),
                       L.Conv2D(6, 3, padding="same", use_bias=False), L.MaxPool2D(),
                       L.BatchNorm(scale=False, momentum=0.6, epsilon=1e-5),
                       L.Activation("gelu"), L.GlobalMaxPool2D(),
                       L.Dense(4, use_bias=False), L.Rescaling(1 / 9),
                       L.Activation("softmax")])


TRICKS = dict(optimizer="sgd", lr=11.5, momentum=0.85, nesterov=True, weight_decay=0.0153,
              decoupled=True, loss_reduction="sum", bias_lr=64, label_smoothing=0.2,
              schedule="warmup_linear", warmup=0.23, lookahead={"every": 5}, dirac_init=True,
              whiten={"images": 50, "eps": 5e-4}, standardize=True,
              augment={"flip": "alternate", "crop": 1, "fill": "reflect"})


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_resume_with_the_new_options_is_bit_exact(engine, tmp_path, monkeypatch):
    from cnnlab.training import TrainingInterrupted, loop
    import signal
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 96)
    common = dict(epochs=3, batch_size=16, seed=3, verbose=0, engine=engine, device="cpu",
                  **TRICKS)
    ref = tiny_airbench()
    ref_hist = fit(ref, (x, y), **common)
    real, count = loop.make_backend, [0]

    def interrupting(*a, **k):
        be = real(*a, **k)
        step = be.train_step

        def train_step(idx, seed, **kw):
            count[0] += 1
            if count[0] == 8:          # epoch 2, step 2: between two lookahead updates
                signal.raise_signal(signal.SIGINT)
            return step(idx, seed, **kw)
        be.train_step = train_step
        return be
    monkeypatch.setattr(loop, "make_backend", interrupting)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fit(tiny_airbench(), (x, y), out=str(run), **common)
    monkeypatch.setattr(loop, "make_backend", real)
    cfg_json = json.loads((run / "config.json").read_text())
    assert cfg_json["train"]["lookahead"] == {"every": 5, "decay": 0.95 ** 5, "power": 3.0}
    resumed = tiny_airbench()
    hist = _resume_on_arrays(run, resumed, (x, y), monkeypatch)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in hist] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in ref_hist]
    for k in ref.weights:
        np.testing.assert_array_equal(resumed.weights[k], ref.weights[k], err_msg=k)


def _resume_on_arrays(run, model, arrays, monkeypatch):
    """resume_run of a run trained on arrays: its data given back as the same arrays."""
    from cnnlab.training import run as run_mod
    real = run_mod.prepare_data
    monkeypatch.setattr(run_mod, "prepare_data", lambda data, cfg, shape: real(arrays, cfg, shape))
    ckpt = run / "checkpoint.safetensors"
    from cnnlab.fileformat import pack, unpack
    tensors, meta = unpack(ckpt)
    meta["trainer"]["config"]["data"] = "cifar10"     # any name: prepare_data is replaced
    ckpt.write_bytes(pack(tensors, meta))
    return resume_run(run, model=model)


def test_cli_evaluate_with_tta(tmp_path):
    import subprocess
    import sys
    model = Sequential([L.Input((28, 28, 1)), L.Conv2D(2, 3), L.GlobalAvgPool2D(),
                        L.Dense(10, activation="softmax")])
    model.meta["training"] = {"dataset": "mnist-5k"}
    model.save(tmp_path / "m.safetensors")
    out = subprocess.run([sys.executable, "-m", "cnnlab.cli", "evaluate", str(tmp_path / "m.safetensors"),
                          "--tta", "--json", "--engine", "numpy"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tta"] == 1
    bad = subprocess.run([sys.executable, "-m", "cnnlab.cli", "evaluate", "x", "--tta", "5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 5" in bad.stderr


# the airbench recipe ---------------------------------------------------------------------
from conftest import SHARED_DATASETS  # noqa: E402

needs_cifar = pytest.mark.skipif(not (SHARED_DATASETS / "cifar10").is_dir(),
                                 reason=f"CIFAR-10 not found at {SHARED_DATASETS}")


def test_airbench_architecture_as_the_record_has_it():
    from cnnlab import zoo
    model = zoo.build("airbench")
    assert model.count_params() == (1_973_920, 1_971_328, 2_592)
    assert [s[1][:2] for s in model.layer_shapes if len(s[1]) == 3][:5] == \
        [(31, 31), (31, 31), (31, 31), (15, 15), (15, 15)]
    assert model.layers[0].trainable is False and model.layers[-2].scale == 1 / 9
    recipe = zoo.recipe("airbench")
    TrainConfig.from_dict({k: v for k, v in recipe.items() if k != "description"}).check()


@needs_cifar
def test_airbench_recipe_trains_and_the_numpy_engine_evaluates_it(tmp_path):
    from cnnlab import datasets, load, zoo
    from cnnlab.evaluate import evaluate
    ds = datasets.load("cifar10", data_dir=SHARED_DATASETS, download=False)
    sub = datasets.Dataset(ds.name, ds.x_train[:256], ds.y_train[:256], ds.x_test[:64],
                           ds.y_test[:64], ds.class_names, ds.source)
    recipe = {k: v for k, v in zoo.recipe("airbench").items() if k not in ("description",)}
    recipe.update(epochs=4, batch_size=64, precision="fp32", engine="torch", device="cpu",
                  whiten={"images": 256, "eps": 5e-4}, out=str(tmp_path / "run"), verbose=0)
    model = zoo.build("airbench")
    hist = fit(model, sub, **recipe)
    losses = [h["loss"] for h in hist]
    assert losses[-1] < losses[0] - 0.1, losses
    saved = load(tmp_path / "run")           # an ordinary model file
    w = saved.weights["whiten.kernel"]
    assert np.abs(w[..., :12] + w[..., 12:]).max() == 0      # whitening filters and negatives
    by_numpy = evaluate(saved, (sub.x_test, sub.y_test), engine="numpy", tta=1)
    by_torch = evaluate(saved, (sub.x_test, sub.y_test), engine="torch", tta=1)
    assert by_numpy["loss"] == pytest.approx(by_torch["loss"], rel=1e-3)
    assert abs(by_numpy["accuracy"] - by_torch["accuracy"]) <= 1 / 64


def test_evaluate_in_bf16_is_close_to_fp32():
    from cnnlab.evaluate import evaluate
    model = Sequential([L.Input((8, 8, 3)), L.Conv2D(8, 3, activation="gelu"),
                        L.GlobalAvgPool2D(), L.Dense(4, activation="softmax")])
    model.init_weights(1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 64)
    fp32 = evaluate(model, (x, y), engine="torch")
    bf16 = evaluate(model, (x, y), engine="torch", precision="bf16")
    assert bf16["loss"] != fp32["loss"]                      # it did run in bf16
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    with pytest.raises(ValueError, match="tta must be one of 0, 1, 2"):
        evaluate(model, (x, y), tta=4)


# the run's time, said up front -----------------------------------------------------------
@pytest.mark.parametrize("seconds_per_step, shown", [(10.0, True), (0.01, False)])
def test_a_long_run_says_up_front_how_long_it_will_take(monkeypatch, capsys,
                                                        seconds_per_step, shown):
    from cnnlab.layers import Dense, Flatten, Input
    from cnnlab.engines.numpy.backend import NumpyBackend
    from cnnlab.training import fit, loop
    clock = {"t": 0.0}
    real_step = NumpyBackend.train_step

    def slow_step(self, *a, **k):   # every step seems to take seconds_per_step
        clock["t"] += seconds_per_step
        return real_step(self, *a, **k)
    monkeypatch.setattr(NumpyBackend, "train_step", slow_step)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    x = np.random.default_rng(0).integers(0, 256, (64, 4, 4, 1), dtype=np.uint8)
    y = np.arange(64) % 2
    model = Sequential([Input((4, 4, 1)), Flatten(), Dense(2, activation="softmax")])
    fit(model, (x, y), epochs=3, batch_size=4, engine="numpy", verbose=2)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("Training will take")]
    if not shown:
        assert notes == []
        return
    # 48 steps of which 4 are done when it speaks
    assert len(notes) == 1
    assert "about 7 min more" in notes[0], notes[0]   # 44 steps of 10 s
    assert "bf16" not in notes[0]   # the NumPy engine computes in fp32: no precision hint


# the zoo's recipes -----------------------------------------------------------------------
def test_every_zoo_recipe_is_a_valid_training_config_and_zoo_shows_its_figures(capsys):
    from cnnlab import cli, zoo
    from cnnlab.training.config import TrainConfig
    for name in zoo.MODELS:
        recipe = {k: v for k, v in zoo.recipe(name).items() if k != "description"}
        TrainConfig.from_dict(recipe).check()
        m = zoo.measured(name)
        if m is not None:
            assert {"data", "accuracy", "minutes", "machine"} <= set(m)
            assert 0 < m["accuracy"] <= 1 and m["minutes"] > 0
    assert cli.main(["zoo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(zoo.MODELS)
    assert all(r["measured"] == zoo.measured(r["name"]) for r in rows)
    assert cli.main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name in zoo.MODELS:
        m = zoo.measured(name)
        if m is not None:
            assert f"{100 * m['accuracy']:.2f}%" in out


def test_mnist_bn_recipe_learns_a_small_subset():
    from cnnlab import datasets, zoo
    from cnnlab.training import fit
    ds = datasets.load("mnist-5k")
    model = zoo.build("mnist-bn")
    recipe = {k: v for k, v in zoo.recipe("mnist-bn").items() if k not in ("description", "data")}
    recipe.update(epochs=4, precision="fp32", verbose=0)
    hist = fit(model, (ds.x_train[:2048], ds.y_train[:2048]), **recipe).history
    # 64 steps: BatchNorm's moving statistics (momentum 0.99) have not settled for
    # evaluation yet; the training loss and accuracy show the learning
    assert all(b < a for a, b in zip(hist["loss"], hist["loss"][1:]))
    assert hist["accuracy"][-1] > 0.5 > hist["accuracy"][0]

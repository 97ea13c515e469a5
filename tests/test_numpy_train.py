"""Training with the NumPy engine, and the two engines agreeing on the same model file."""
import signal

import numpy as np
import pytest

from cnnlab import datasets, zoo
from cnnlab.engines.numpy.engine import NumpyEngine
from cnnlab.engines.torch.engine import TorchEngine
from cnnlab import load
from cnnlab.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, Input, MaxPool2D
from cnnlab import Sequential
from cnnlab.training import TrainingInterrupted, fit, resume_run


@pytest.fixture(scope="module")
def mnist5k():
    return datasets.load("mnist-5k")


def subset(ds, n, n_test=200):
    perm = np.random.default_rng(1).permutation(len(ds.x_train))[:n]
    return datasets.Dataset(ds.name, ds.x_train[perm], ds.y_train[perm], ds.x_test[:n_test],
                            ds.y_test[:n_test], ds.class_names, ds.source)


@pytest.mark.slow
def test_lenet_with_numpy_engine_reaches_95_percent(mnist5k, tmp_path):
    model = zoo.build("lenet")
    recipe = {k: v for k, v in zoo.recipe("lenet").items() if k not in ("description", "data")}
    recipe["epochs"] = 8
    hist = fit(model, mnist5k, engine="numpy", out=str(tmp_path / "run"), verbose=0, **recipe)
    assert hist[-1]["val_accuracy"] >= 0.95 > hist[0]["accuracy"]
    # the file it wrote runs in the torch engine with the same predictions
    saved = load(tmp_path / "run")
    x = mnist5k.x_test[:64].astype(np.float32) / 255
    np.testing.assert_allclose(TorchEngine(saved).predict_proba(x),
                               NumpyEngine(saved).predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("optimizer", [dict(optimizer="sgd", momentum=0.9, nesterov=True,
                                            weight_decay=1e-3),
                                       dict(optimizer="adam"), dict(optimizer="adamw"),
                                       dict(optimizer="rmsprop", momentum=0.5)])
def test_engines_take_the_same_steps(mnist5k, optimizer):
    """A few steps from the same state give the same weights in both engines."""
    ds = subset(mnist5k, 96)
    def net():
        return Sequential([Input((28, 28, 1)), Conv2D(4, 3, strides=2, padding="same",
                                                       activation="relu"),
                           BatchNorm(), MaxPool2D(), Flatten(), Dense(10, activation="softmax")])
    a, b = net(), net()
    opts = dict(epochs=1, batch_size=32, lr=1e-2, verbose=0, **optimizer)
    fit(a, ds, engine="torch", **opts)
    fit(b, ds, engine="numpy", **opts)
    for k in a.weights:
        np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_numpy_resume_after_ctrl_c_is_exact(mnist5k, tmp_path, monkeypatch):
    ds = subset(mnist5k, 128)
    def net():
        return Sequential([Input((28, 28, 1)), Conv2D(3, 3, activation="relu"), BatchNorm(),
                           MaxPool2D(2), Flatten(), Dropout(0.3), Dense(10, activation="softmax")])
    common = dict(epochs=2, batch_size=32, seed=4, engine="numpy", verbose=0, data="mnist-5k")
    ref = net()
    ref_hist = fit(ref, ds, **common)
    from cnnlab.engines.numpy import backend as numpy_train
    real = numpy_train.NumpyBackend.train_step
    calls = {"n": 0}
    def step(self, idx, seed):
        calls["n"] += 1
        if calls["n"] == 6:          # Ctrl-C during epoch 2, step 2
            signal.raise_signal(signal.SIGINT)
        return real(self, idx, seed)
    monkeypatch.setattr(numpy_train.NumpyBackend, "train_step", step)
    with pytest.raises(TrainingInterrupted):
        fit(net(), ds, out=str(tmp_path / "run"), **common)
    monkeypatch.setattr(numpy_train.NumpyBackend, "train_step", real)
    monkeypatch.setattr(datasets, "load", lambda *a, **k: ds)
    resumed = net()
    hist = resume_run(tmp_path / "run", model=resumed)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in hist] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in ref_hist]
    for k in ref.weights:
        np.testing.assert_array_equal(resumed.weights[k], ref.weights[k], err_msg=k)


def test_zoo_models_agree_across_engines():
    rng = np.random.default_rng(0)
    for name in zoo.names():
        m = zoo.build(name)
        m.init_weights(11)
        x = rng.random((4, *m.input_shape)).astype(np.float32)
        t = TorchEngine(m).forward(x)
        n = NumpyEngine(m).forward(x)
        np.testing.assert_allclose(n, t, rtol=1e-4, atol=1e-4, err_msg=name)

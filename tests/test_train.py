"""Training with the PyTorch engine: accuracy rises, resume is exact, checkpoints are safe."""
import json
import os
import signal

import numpy as np
import pytest

from cnnlab import datasets, zoo
from cnnlab import load
from cnnlab.fileformat import unpack
from cnnlab.training import TrainConfig, TrainingError, TrainingInterrupted, fit, resume_run, scheduled_lr


@pytest.fixture(scope="module")
def mnist5k():
    return datasets.load("mnist-5k")


def small(ds, n=600):
    """A small slice of mnist-5k with the test split kept, for fast loops."""
    perm = np.random.default_rng(0).permutation(len(ds.x_train))[:n]
    return datasets.Dataset(ds.name, ds.x_train[perm], ds.y_train[perm], ds.x_test[:200],
                            ds.y_test[:200], ds.class_names, ds.source)


def test_lenet_reaches_95_percent_on_mnist5k(mnist5k, tmp_path):
    model = zoo.build("lenet")
    recipe = {k: v for k, v in zoo.recipe("lenet").items() if k not in ("description", "data")}
    history = fit(model, mnist5k, out=str(tmp_path / "run"), verbose=0, **recipe)
    assert history[0]["accuracy"] < history[-1]["accuracy"]
    assert history[-1]["val_accuracy"] >= 0.95
    saved = load(tmp_path / "run")
    assert saved.meta["training"]["test_accuracy"] >= 0.95
    assert saved.meta["class_names"] == [str(i) for i in range(10)]
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,accuracy") and len(rows) == len(history) + 1
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["lr"] == recipe["lr"] and cfg["model"] == model.get_config()


def test_same_seed_same_history(mnist5k):
    ds = small(mnist5k)
    h1 = fit(zoo.build("lenet"), ds, epochs=2, seed=7, verbose=0)
    h2 = fit(zoo.build("lenet"), ds, epochs=2, seed=7, verbose=0)
    h3 = fit(zoo.build("lenet"), ds, epochs=2, seed=8, verbose=0)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(h1) == strip(h2)
    assert strip(h1) != strip(h3)


class Interrupt:
    """A real Ctrl-C (SIGINT) arriving in the middle of the n-th training step."""
    def __init__(self, at):
        self.at, self.count = at, 0

    def wrap(self, step):
        def train_step(idx, seed):
            self.count += 1
            if self.count == self.at:
                signal.raise_signal(signal.SIGINT)
            return step(idx, seed)
        return train_step


@pytest.mark.parametrize("opt", [dict(optimizer="adam"),
                                 dict(optimizer="sgd", momentum=0.9, nesterov=True,
                                      schedule="onecycle", augment={"translate": 2, "flip": True}),
                                 dict(optimizer="rmsprop", schedule="cosine")])
def test_resume_after_ctrl_c_equals_uninterrupted(mnist5k, tmp_path, monkeypatch, opt):
    ds = small(mnist5k, 400)
    # cifar-bn-like pieces (dropout, batchnorm) make RNG and running stats matter
    from cnnlab.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, Input, MaxPool2D
    from cnnlab import Sequential
    def net():
        return Sequential([Input((28, 28, 1)), Conv2D(4, 3, activation="relu"), BatchNorm(),
                           MaxPool2D(), Flatten(), Dropout(0.3), Dense(10, activation="softmax")])
    common = dict(epochs=3, batch_size=64, seed=3, verbose=0, data="mnist-5k", **opt)
    ref = net()
    ref_hist = fit(ref, ds, **common)

    from cnnlab.engines.torch import backend as torch_train
    real_init = torch_train.TorchBackend.__init__
    stopper = Interrupt(at=10)          # 10th step = epoch 2, step 3 (7 steps per epoch)
    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.train_step = stopper.wrap(self.train_step)
    monkeypatch.setattr(torch_train.TorchBackend, "__init__", init)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=f"resume with: cnnlab train --resume {run}"):
        fit(net(), ds, out=str(run), **common)
    monkeypatch.setattr(torch_train.TorchBackend, "__init__", real_init)
    _, meta = unpack(run / "checkpoint.safetensors")
    # the step in flight finished; the loop stopped before the next one
    assert (meta["trainer"]["epoch"], meta["trainer"]["step_in_epoch"]) == (1, 3)
    assert (run / "model.safetensors").exists()     # the work so far is usable
    # resume_run reloads mnist-5k by name: restrict it to the same slice
    monkeypatch.setattr(datasets, "load", lambda *a, **k: ds)
    resumed = net()
    hist = resume_run(run, model=resumed)
    assert len(hist) == 3
    assert hist == [{**h, "seconds": r["seconds"]} for h, r in zip(ref_hist, hist)]
    for k in ref.weights:
        np.testing.assert_array_equal(resumed.weights[k], ref.weights[k], err_msg=k)


def test_early_stopping_restores_best_weights(mnist5k):
    ds = small(mnist5k, 300)
    model = zoo.build("lenet")
    # min_delta so large that nothing after the first epoch counts as better
    h = fit(model, ds, epochs=10, lr=1e-3, verbose=0,
            early_stopping={"monitor": "val_loss", "patience": 2, "min_delta": 100.0})
    assert len(h) == 3
    best = fit(zoo.build("lenet"), ds, epochs=1, lr=1e-3, verbose=0)
    assert best[0]["val_loss"] == h[0]["val_loss"]
    from cnnlab.evaluate import evaluate
    res = evaluate(model, (ds.x_test, ds.y_test))
    assert abs(res["loss"] - h[0]["val_loss"]) < 1e-4     # weights of epoch 1 are back


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(mnist5k, tmp_path, monkeypatch):
    ds = small(mnist5k, 200)
    run = tmp_path / "run"
    fit(zoo.build("lenet"), ds, epochs=1, out=str(run), verbose=0)
    before = (run / "checkpoint.safetensors").read_bytes()
    real_replace = os.replace
    def crash(src, dst):
        if str(dst).endswith("checkpoint.safetensors"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        fit(zoo.build("lenet"), ds, epochs=1, seed=5, out=str(run), verbose=0)
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    _, meta = unpack(run / "checkpoint.safetensors")
    assert meta["trainer"]["epoch"] == 1


def test_schedules():
    cfg = TrainConfig(lr=0.1, schedule="step", step_size=2, gamma=0.5)
    assert [scheduled_lr(cfg, 0, 100, e) for e in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    cfg = TrainConfig(lr=0.1, schedule="cosine")
    assert scheduled_lr(cfg, 0, 100, 0) == 0.1 and abs(scheduled_lr(cfg, 50, 100, 0) - 0.05) < 1e-12
    cfg = TrainConfig(lr=0.1, schedule="onecycle", warmup=0.3)
    lrs = [scheduled_lr(cfg, s, 100, 0) for s in range(100)]
    assert abs(lrs[0] - 0.004) < 1e-12 and max(lrs) == lrs[30] == 0.1 and lrs[-1] < 0.001
    cfg = TrainConfig(lr=0.1, schedule="plateau")
    assert scheduled_lr(cfg, 5, 10, 0, plateau_factor=0.1) == pytest.approx(0.01)


def test_bad_settings_are_rejected_with_allowed_values(mnist5k):
    with pytest.raises(TrainingError, match="unknown optimizer 'adamm'; allowed: sgd, adam"):
        fit(zoo.build("lenet"), mnist5k, optimizer="adamm", verbose=0)
    with pytest.raises(TrainingError, match="unknown training option"):
        fit(zoo.build("lenet"), mnist5k, epoch=3, verbose=0)
    with pytest.raises(TrainingError, match="images are 28x28x1 but the model expects 32x32x3"):
        fit(zoo.build("cifar-basic"), mnist5k, verbose=0)
    with pytest.raises(TrainingError, match="binary_crossentropy needs a 1-unit sigmoid"):
        fit(zoo.build("lenet"), mnist5k, loss="binary_crossentropy", verbose=0)


def test_binary_and_mse_losses_learn(mnist5k):
    from cnnlab.layers import Dense, Flatten, Input, MaxPool2D
    from cnnlab import Sequential
    ds = mnist5k
    keep = ds.y_train < 2
    x, y = ds.x_train[keep], ds.y_train[keep]
    m = Sequential([Input((28, 28, 1)), MaxPool2D(4), Flatten(), Dense(1, activation="sigmoid")])
    h = fit(m, (x, y), epochs=5, lr=1e-2, loss="binary_crossentropy", val_split=0.2, verbose=0)
    assert h[-1]["val_accuracy"] > 0.95
    m = Sequential([Input((28, 28, 1)), MaxPool2D(2), Flatten(), Dense(10, activation="softmax")])
    h = fit(m, small(ds, 1000), epochs=3, loss="mse", lr=3e-3, verbose=0)
    assert h[-1]["val_accuracy"] > h[0]["val_accuracy"] - 0.02 and h[-1]["val_accuracy"] > 0.7


def test_sigmoid_output_trains_the_same_way_in_both_engines(mnist5k):
    """categorical_crossentropy on a 1-unit sigmoid output means binary cross-entropy,
    in both engines; mse on it compares the probability with the 0/1 label."""
    from cnnlab.layers import Dense, Flatten, Input, MaxPool2D
    from cnnlab import Sequential
    keep = mnist5k.y_train < 2
    x, y = mnist5k.x_train[keep][:256], mnist5k.y_train[keep][:256]
    for loss in ("categorical_crossentropy", "binary_crossentropy", "mse"):
        models = []
        for engine in ("torch", "numpy"):
            m = Sequential([Input((28, 28, 1)), MaxPool2D(4), Flatten(),
                            Dense(1, activation="sigmoid")])
            h = fit(m, (x, y), epochs=1, lr=1e-2, loss=loss, engine=engine, verbose=0)
            models.append((m, h))
        (a, ha), (b, hb) = models
        assert ha[0]["loss"] == pytest.approx(hb[0]["loss"], rel=1e-4), loss
        for k in a.weights:
            np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-4, atol=1e-5)
    m = Sequential([Input((28, 28, 1)), Flatten(), Dense(3, activation="sigmoid")])
    with pytest.raises(TrainingError, match="multi-label"):
        fit(m, (x, y), verbose=0)


def test_keras_style_arrays(mnist5k):
    from cnnlab.layers import Dense, Flatten, Input
    from cnnlab import Sequential
    x, y = mnist5k.x_train[:200], mnist5k.y_train[:200]
    m = Sequential([Input((28, 28, 1)), Flatten(), Dense(10, activation="softmax")])
    with pytest.raises(TrainingError, match=r"float images must be in \[0, 1\]"):
        m.fit(x.astype(np.float32), y, epochs=1, verbose=0)
    onehot = np.eye(10, dtype=np.float32)[y]
    h1 = m.fit(x.astype(np.float32) / 255, onehot, epochs=1, verbose=0, val_split=0.1)
    # a second fit continues from the trained weights, as in Keras
    w = {k: v.copy() for k, v in m.weights.items()}
    h2 = m.fit(x, y, epochs=1, verbose=0, val_split=0.1)
    assert h2[0]["loss"] < h1[0]["loss"]
    assert not np.array_equal(w["dense.kernel"], m.weights["dense.kernel"])
    with pytest.raises(TrainingError, match="labels must be"):
        m.fit(x, y[:10], verbose=0)


def test_failed_setup_writes_nothing(mnist5k, tmp_path):
    with pytest.raises(TrainingError):
        fit(zoo.build("lenet"), mnist5k, loss="binary_crossentropy", out=str(tmp_path / "r"),
            verbose=0)
    assert not (tmp_path / "r").exists()


def test_resume_brings_every_file_of_a_finished_run_up_to_date(mnist5k, tmp_path, capsys):
    """A kill after the last checkpoint's rename but before history.csv and the model were
    written: the resume trains nothing, says so, and writes the missing files."""
    ds, run = small(mnist5k, 300), tmp_path / "run"
    history = fit(zoo.build("lenet"), ds, epochs=2, verbose=2, out=str(run))
    full = (run / "history.csv").read_text()
    rows = full.splitlines()
    (run / "history.csv").write_text("\n".join(rows[:-1]) + "\n")   # one row short
    (run / "model.safetensors").unlink()
    capsys.readouterr()
    again = resume_run(run)
    assert "already finished (2 epochs)" in capsys.readouterr().out
    assert again == history
    assert (run / "history.csv").read_text() == full
    assert load(run).meta["training"]["epochs"] == 2


def test_resume_with_more_epochs_extends_the_run(mnist5k, tmp_path, capsys):
    ds, run = small(mnist5k, 300), tmp_path / "run"
    fit(zoo.build("lenet"), ds, epochs=1, verbose=2, out=str(run))
    capsys.readouterr()
    history = resume_run(run, epochs=3)
    out = capsys.readouterr().out
    assert "Extending" in out and "from 1 to 3 epochs" in out
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert len((run / "history.csv").read_text().splitlines()) == 4
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    with pytest.raises(TrainingError, match="already trained 3 epochs"):
        resume_run(run, epochs=2)


def test_fit_returns_a_keras_like_history(mnist5k):
    from cnnlab.inspect import read_history
    h = zoo.build("lenet").fit(small(mnist5k, 200), epochs=2, verbose=0)
    assert set(h.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert h.history["loss"] == [row["loss"] for row in h] and len(h.history["loss"]) == 2
    assert h.epoch == [0, 1] and h[1]["epoch"] == 2
    np.testing.assert_allclose(read_history(h.history)["val_accuracy"],
                               [row["val_accuracy"] for row in h])


def test_keras_style_compile_add_and_validation_data(mnist5k):
    from cnnlab import Dense, Flatten, Input, ModelError, Sequential
    m = Sequential()
    with pytest.raises(ModelError, match="no layers yet"):
        m.summary()
    m.add(Input((28, 28, 1)))
    m.add(Flatten())
    m.add(Dense(10, activation="softmax"))
    assert m.count_params()[0] == 7850
    with pytest.raises(ModelError, match="unknown metric"):
        m.compile(metrics=["f1"])
    with pytest.raises(TrainingError, match="unknown training option"):
        m.compile(optimizer={"name": "sgd", "nesterovv": True})
    m.compile(optimizer={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = small(mnist5k, 400)
    h = m.fit(ds.x_train, ds.y_train, epochs=2, verbose=0,
              validation_data=(ds.x_test[:100], ds.y_test[:100]))
    assert h[-1]["lr"] == 0.1 and h.history["val_accuracy"][-1] > 0.5
    res = m.evaluate((ds.x_test[:100], ds.y_test[:100]), engine="numpy")
    assert res["accuracy"] == pytest.approx(h[-1]["val_accuracy"], abs=1e-9)
    m.add(Dense(10, activation="softmax"))            # keeps the trained weights below it
    assert m.layers[-1].name == "dense_1" and "dense.kernel" in m.weights


def test_cli_shorthands_work_in_python_too():
    cfg = TrainConfig(early_stopping=3, augment="flip,translate=2").check()
    assert cfg.early_stopping["patience"] == 3 and cfg.early_stopping["monitor"] == "val_loss"
    assert cfg.augment["flip"] is True and cfg.augment["translate"] == 2
    assert TrainConfig(augment="none").check().augment == {}
    with pytest.raises(TrainingError, match="twirl"):
        TrainConfig(augment="twirl=3").check()


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_transfer_learning_keeps_frozen_weights_and_trains_the_head(mnist5k, engine):
    """Keras' recipe: a trained base, frozen (trainable=False), under a new head."""
    from cnnlab import Dense, Flatten, Input, Sequential
    ds = small(mnist5k, 300)
    base = zoo.build("lenet")
    base.fit(ds, epochs=1, verbose=0, engine=engine)
    from cnnlab.layers import from_config, to_config
    frozen = [from_config({**to_config(layer), "trainable": False}) for layer in base.layers[:4]]
    model = Sequential([Input((28, 28, 1)), *frozen, Flatten(name="flat"),
                        Dense(10, activation="softmax", name="head")])
    model.set_weights({**{k: v for k, v in base.weights.items() if k in model.weights},
                       **{k: v for k, v in model.weights.items() if k.startswith("head.")}})
    before = {k: v.copy() for k, v in model.weights.items()}
    assert model.count_params()[1] == 7850      # only the head trains
    model.fit(ds, epochs=1, verbose=0, engine=engine)
    for k, v in before.items():
        if k.startswith("head."):
            assert not np.array_equal(model.weights[k], v), k
        else:
            assert np.array_equal(model.weights[k], v), k


def test_fit_with_resume_refuses_settings_it_would_ignore(mnist5k, tmp_path):
    run = tmp_path / "run"
    fit(zoo.build("lenet"), small(mnist5k, 200), epochs=1, verbose=0, out=str(run))
    with pytest.raises(TrainingError, match="lr cannot change"):
        fit(zoo.build("lenet"), resume=run, lr=0.5)
    h = fit(zoo.build("lenet"), resume=run, epochs=2, verbose=0)
    assert len(h) == 2
    with pytest.raises(TrainingError, match=r"momentum must be in \[0, 1\)"):
        TrainConfig(optimizer="sgd", momentum=1.0).check()
    import stat
    mode = stat.S_IMODE((run / "model.safetensors").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask     # readable by whoever a new file is readable by

"""Callbacks behave as Keras' own: the same random metric sequences drive cnnlab's and
Keras' EarlyStopping / ReduceLROnPlateau to the same decisions; and in a real fit()."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab import datasets, zoo
from cnnlab.callbacks import (CSVLogger, EarlyStopping, LambdaCallback, LearningRateScheduler,
                              ModelCheckpoint, ReduceLROnPlateau)

keras = pytest.importorskip("keras") if os.environ.get("KERAS_BACKEND") else None


class FakeBackend:
    def __init__(self, trainer):
        self.trainer, self.w = trainer, 0

    @property
    def lr(self):
        return 0.1 * self.trainer.lr_scale

    def export_weights(self):
        return {"w": self.w}

    def set_weights(self, w):
        self.w = w["w"]


class FakeTrainer:
    def __init__(self):
        self.model = type("M", (), {"stop_training": False})()
        self.lr_scale, self.lr_override = 1.0, None
        self.backend = FakeBackend(self)


def drive_ours(cb, values, monitor):
    t = FakeTrainer()
    cb.set_trainer(t)
    cb.on_train_begin()
    stopped, lrs = None, []
    for epoch, v in enumerate(values):
        t.backend.w = epoch
        cb.on_epoch_end(epoch, {monitor: v})
        lrs.append(t.backend.lr)
        if t.model.stop_training:
            stopped = epoch
            break
    cb.on_train_end()
    return stopped, lrs, t.backend.w


def drive_keras(cb, values, monitor):
    class Opt:
        learning_rate = 0.1

    class M:
        stop_training = False
        optimizer = Opt()
        w = 0

        def get_weights(self):
            return [self.w]

        def set_weights(self, w):
            self.w = w[0]
    m = M()
    cb.set_model(m)
    cb.on_train_begin()
    stopped, lrs = None, []
    for epoch, v in enumerate(values):
        m.w = epoch
        cb.on_epoch_end(epoch, {monitor: v})
        lrs.append(float(m.optimizer.learning_rate))
        if m.stop_training:
            stopped = epoch
            break
    cb.on_train_end()
    return stopped, lrs, m.w


# no value sits within float32 rounding of a min_delta boundary (Keras compares in float32)
values = st.lists(st.sampled_from([0.5, 0.45, 0.4, 0.41, 0.39, 0.3995, 0.6]), min_size=1,
                  max_size=14)


@pytest.mark.skipif(keras is None, reason="keras (the oracle) is not installed")
@settings(max_examples=60, deadline=None)
@given(values, st.integers(0, 4), st.sampled_from([0.0, 0.005]), st.booleans(),
       st.sampled_from(["val_loss", "val_accuracy"]))
def test_early_stopping_decides_as_keras(vals, patience, min_delta, restore, monitor):
    kw = dict(monitor=monitor, patience=patience, min_delta=min_delta,
              restore_best_weights=restore)
    mode = "max" if "acc" in monitor else "min"  # Keras' own 'auto' needs a compiled model
    ours = drive_ours(EarlyStopping(**kw), vals, monitor)
    assert ours == drive_ours(EarlyStopping(**kw, mode=mode), vals, monitor)
    assert ours == drive_keras(keras.callbacks.EarlyStopping(**kw, mode=mode), vals, monitor)


@pytest.mark.skipif(keras is None, reason="keras (the oracle) is not installed")
@settings(max_examples=60, deadline=None)
@given(values, st.integers(0, 3), st.integers(0, 2), st.sampled_from([0.5, 0.1]),
       st.sampled_from([0.0, 0.02]))
def test_reduce_lr_on_plateau_decides_as_keras(vals, patience, cooldown, factor, min_lr):
    kw = dict(monitor="val_loss", patience=patience, cooldown=cooldown, factor=factor,
              min_lr=min_lr)
    ours = drive_ours(ReduceLROnPlateau(**kw), vals, "val_loss")[1]
    theirs = drive_keras(keras.callbacks.ReduceLROnPlateau(**kw), vals, "val_loss")[1]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_early_stopping_by_hand():
    # best 0.4 at epoch 2; patience 2 -> stops at epoch 4, restores epoch 2's weights
    stopped, _, w = drive_ours(EarlyStopping(patience=2, restore_best_weights=True),
                               [0.5, 0.45, 0.4, 0.41, 0.42, 0.3], "val_loss")
    assert stopped == 4 and w == 2


def test_callbacks_in_a_real_fit(tmp_path):
    ds = datasets.load("mnist-5k")
    small = datasets.Dataset(ds.name, ds.x_train[:300], ds.y_train[:300], ds.x_test[:100],
                             ds.y_test[:100], ds.class_names, ds.source)
    seen = []
    model = zoo.build("lenet")
    h = model.fit(small, epochs=4, verbose=0, callbacks=[
        LearningRateScheduler(lambda epoch, lr: 0.01 / (epoch + 1)),
        ModelCheckpoint(str(tmp_path / "ck-{epoch:02d}.safetensors")),
        CSVLogger(tmp_path / "log.csv"),
        LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append((epoch, logs["loss"])))])
    assert [r["lr"] for r in h] == pytest.approx([0.01, 0.005, 0.01 / 3, 0.0025])
    assert sorted(p.name for p in tmp_path.glob("ck-*")) == [f"ck-0{i}.safetensors"
                                                            for i in range(1, 5)]
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 5 and rows[1].startswith("0,")
    assert seen == [(i, r["loss"]) for i, r in enumerate(h)]
    import cnnlab
    last = cnnlab.load(tmp_path / "ck-04.safetensors")
    assert all(np.array_equal(last.weights[k], model.weights[k]) for k in model.weights)
    m2 = zoo.build("lenet")   # a callback stops training as in Keras: model.stop_training
    h2 = m2.fit(small, epochs=10, verbose=0, callbacks=[LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(m2, "stop_training", epoch == 1))])
    assert len(h2) == 2

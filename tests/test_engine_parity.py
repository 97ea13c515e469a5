"""The PyTorch and NumPy engines agree on random architectures from the whole vocabulary.

In float64: outputs and every layer's activations to 1e-8; input gradients (vjp) and
the parameter gradients of the loss (training mode: batch statistics in BatchNorm) to
1e-6; and the torch network's parameter count equals the description's.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from cnnlab import layers as L
from cnnlab import Sequential

torch.set_num_threads(1)

from parity import check_inference, check_param_count, check_training, models  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.sampled_from(["crossentropy", "mse"]), st.sampled_from([0.0, 0.1]))
def test_engines_agree_on_random_architectures(case, loss, label_smoothing):
    model, x, rng = case
    note(f"{model.to_json(indent=None)}, batch {len(x)}")
    check_param_count(model)
    check_inference(model, x, rng)
    check_training(model, x, rng, loss, label_smoothing)


@pytest.mark.parametrize("dims", [(6, 1, 1), (1, 5, 1), (4, 4, 1)])
def test_batchnorm_on_one_value_per_channel_trains_as_numpy(dims):
    """A batch of one on 1x1 maps or flat features: var = 0, output beta, as NumPy."""
    layers = [L.Input(dims), L.Conv2D(2, dims[:2]), L.BatchNorm(momentum=0.5), L.Flatten(),
              L.BatchNorm(momentum=0.9), L.Dense(3, "softmax")]
    model = Sequential(layers)
    model.init_weights(1)
    x = np.random.default_rng(0).normal(size=(1, *dims))
    check_training(model, x, np.random.default_rng(1), "crossentropy", 0.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_random_model_json_round_trips_exactly(case):
    model = case[0]
    again = Sequential.from_json(model.to_json())
    assert again.get_config() == model.get_config()
    assert again.count_params() == model.count_params()
    assert again.layer_shapes == model.layer_shapes

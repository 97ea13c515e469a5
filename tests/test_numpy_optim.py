"""numpy_optim: each step equals torch.optim's from the same state."""
import json

import numpy as np
import pytest
import torch

from cnnlab.engines.numpy.optim import OPTIMIZERS, make_optimizer

TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
         "rmsprop": torch.optim.RMSprop}
CONFIGS = [
    ("sgd", 0.1, {}),
    ("sgd", 0.05, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", 0.05, {"momentum": 0.8, "dampening": 0.3}),
    ("adam", 1e-2, {}),
    ("adam", 1e-2, {"betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}),
    ("adam", 1e-2, {"amsgrad": True}),
    ("adamw", 1e-2, {}),
    ("adamw", 3e-2, {"weight_decay": 0.5, "betas": [0.5, 0.99]}),
    ("rmsprop", 1e-2, {}),
    ("rmsprop", 1e-2, {"momentum": 0.9, "weight_decay": 1e-2, "alpha": 0.9}),
    ("rmsprop", 1e-3, {"centered": True, "momentum": 0.5}),
]


def make_params(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {"conv2d.kernel": rng.standard_normal((3, 3, 2, 4)).astype(dtype),
            "conv2d.bias": rng.standard_normal(4).astype(dtype)}


def grads_at(step, params, dtype=np.float64):
    rng = np.random.default_rng(100 + step)
    return {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}


def torch_copy(params):
    return {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}


@pytest.mark.parametrize("name,lr,hyper", CONFIGS)
def test_steps_match_torch(name, lr, hyper):
    params = make_params()
    tparams = torch_copy(params)
    opt = make_optimizer(name, params, lr=lr, **hyper)
    topt = TORCH[name](list(tparams.values()), lr=lr, **hyper)
    for step in range(6):
        if step == 3:  # a schedule changes the learning rate
            opt.lr = lr * 0.3
            topt.param_groups[0]["lr"] = lr * 0.3
        grads = grads_at(step, params)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        opt.step(grads)
        topt.step()
        for k, v in params.items():
            np.testing.assert_allclose(v, tparams[k].detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_are_torch_defaults(name):
    opt = make_optimizer(name, make_params())
    t = TORCH[name]([torch.zeros(1, requires_grad=True)]).defaults
    assert opt.lr == t["lr"]
    for key, value in opt.hyper.items():
        assert t[key] == value, key


@pytest.mark.parametrize("name,lr,hyper", CONFIGS)
def test_state_dict_round_trip(name, lr, hyper):
    straight, resumed = make_params(), make_params()
    opt = make_optimizer(name, straight, lr=lr, **hyper)
    opt2 = make_optimizer(name, resumed, lr=lr, **hyper)
    for step in range(3):
        opt.step(grads_at(step, straight))
        opt2.step(grads_at(step, resumed))
    arrays, meta = opt2.state_dict()
    meta = json.loads(json.dumps(meta))  # checkpoints store it as JSON
    arrays = {k: v.copy() for k, v in arrays.items()}
    fresh = make_optimizer(name, resumed, lr=123.0)
    fresh.load_state_dict(arrays, meta)
    assert fresh.lr == lr
    for step in range(3, 6):
        opt.step(grads_at(step, straight))
        fresh.step(grads_at(step, resumed))
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k])


def test_float32_stays_float32():
    for name, lr, hyper in CONFIGS:
        params = make_params(np.float32)
        opt = make_optimizer(name, params, lr=lr, **hyper)
        for step in range(2):
            opt.lr = np.float64(lr)  # as a schedule might set it
            opt.step(grads_at(step, params, np.float32))
        arrays, _ = opt.state_dict()
        assert all(a.dtype == np.float32 for a in [*params.values(), *arrays.values()]), name


def test_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("adagrad", make_params())
    with pytest.raises(ValueError, match="unknown option"):
        make_optimizer("adam", make_params(), momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        make_optimizer("sgd", make_params(), nesterov=True)
    _, meta = make_optimizer("sgd", make_params()).state_dict()
    with pytest.raises(ValueError, match="not 'adam'"):
        make_optimizer("Adam", make_params()).load_state_dict({}, meta)

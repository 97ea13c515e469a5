"""Layer descriptions: the one place that says what each layer is.

A layer here holds only its configuration (Keras names, arguments and
defaults), computes its output shape and lists its parameters. The math lives
in the engines (`cnnlab.engines.numpy.ops`, `cnnlab.engines.torch.engine`),
which both read these descriptions. Shapes are channels-last, (H, W, C), as in
Keras, and weights use Keras' layouts:

    Conv2D     kernel (kh, kw, in, out), bias (out,)
    Dense      kernel (in, out),         bias (out,)
    BatchNorm  gamma, beta, moving_mean, moving_variance, each (C,)

Every layer takes `trainable` (Keras' flag): a layer built with trainable=False keeps its
weights as they are in training (the optimizer skips them), and they count as
non-trainable parameters, as Keras prints them.
"""
from __future__ import annotations

import difflib
import inspect
import math

ACTIVATIONS = ("linear", "relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh",
               "softplus", "softmax")
PADDINGS = ("valid", "same", "full")


class ModelError(ValueError):
    """A model description that cannot work; the message names the layer."""


def _pair(value, what):
    if isinstance(value, bool):
        raise ModelError(f"{what} must be an int or a pair of ints, got {_short(value)}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise ModelError(f"{what} must be an int or a pair of ints, got {_short(value)}")


def _check_activation(name):
    if name is None:
        return "linear"
    if name not in ACTIVATIONS:
        raise ModelError(f"unknown activation {_short(name)}; allowed: {', '.join(ACTIVATIONS)}")
    return name


def _check_padding(padding, allowed=PADDINGS):
    if isinstance(padding, str):
        if padding not in allowed:
            raise ModelError(f"unknown padding {_short(padding)}; allowed: {', '.join(allowed)}, "
                             "an int or a pair (ph, pw)")
        return padding
    if "explicit" not in allowed:
        raise ModelError(f"padding must be one of {', '.join(allowed)}, got {_short(padding)}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ModelError(f"padding must be >= 0, got {_short(padding)}")
    return ph if ph == pw else [ph, pw]


def pad_amounts(n: int, k: int, s: int, padding, axis: int = 0) -> tuple[int, int]:
    """Padding (before, after) along one axis of size n for kernel k, stride s.

    'valid': none.  'full': k-1 on both sides (output n + k - 1 at stride 1).
    'same' (exactly as Keras): out = ceil(n / s), total = max((out-1)*s + k - n, 0),
    before = total // 2, the odd pixel after (bottom/right).
    An int p, or a pair (ph, pw), pads symmetrically.
    """
    if padding == "valid":
        return (0, 0)
    if padding == "full":
        return (k - 1, k - 1)
    if padding == "same":
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        return (total // 2, total - total // 2)
    p = _pair(padding, "padding")[axis]
    return (p, p)


def conv_output_size(n: int, k: int, s: int, before: int, after: int) -> int:
    """out = floor((n + p_total - k) / s) + 1."""
    return (n + before + after - k) // s + 1


class Layer:
    """Base description. Subclasses set `type` and implement `output_shape`.

    weight_params: the parameters gradients reach (kernel, bias, gamma, beta);
    state_params: those training updates without gradients (BatchNorm's moving statistics).
    trainable_params / non_trainable_params split them as Keras counts them: a layer with
    trainable=False has all its parameters non-trainable.
    """
    type = "Layer"
    default_name = "layer"
    weight_params: tuple[str, ...] = ()
    state_params: tuple[str, ...] = ()

    def __init__(self, name: str | None = None, trainable: bool = True):
        if name is not None and (not isinstance(name, str) or not name
                                 or any(c in name for c in " ./")):
            raise ModelError(f"layer name must be a non-empty string without spaces, "
                             f"dots or slashes, got {_short(name)}")
        if not isinstance(trainable, bool):
            raise ModelError(f"trainable must be true or false, got {_short(trainable)}")
        self.name = name
        self.trainable = trainable

    @property
    def trainable_params(self) -> tuple[str, ...]:
        return self.weight_params if self.trainable else ()

    @property
    def non_trainable_params(self) -> tuple[str, ...]:
        return self.state_params if self.trainable else self.weight_params + self.state_params

    # configuration --------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments, JSON-ready (name excluded)."""
        return {}

    def output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def param_shapes(self, input_shape: tuple) -> dict[str, tuple]:
        """Parameter name -> shape, trainable ones first (Keras order)."""
        return {}

    def count_params(self, input_shape) -> int:
        return sum(math.prod(s) for s in self.param_shapes(input_shape).values())

    def __repr__(self):
        config = self.get_config() if self.trainable else {**self.get_config(), "trainable": False}
        args = ", ".join(f"{k}={v!r}" for k, v in config.items())
        return f"{self.type}({args})"

    def __eq__(self, other):
        return (type(self) is type(other) and self.name == other.name
                and self.trainable == other.trainable
                and self.get_config() == other.get_config())


def _need_image(layer, shape, idx_name):
    if len(shape) != 3:
        raise ModelError(f"{idx_name}: expects an image input (H, W, C), got shape "
                         f"{tuple(shape)}; put it before Flatten/Dense")


class Input(Layer):
    """The input shape (H, W, C) without the batch axis."""
    type = "Input"
    default_name = "input"

    def __init__(self, shape, name=None, trainable=True):
        super().__init__(name, trainable)
        if not (isinstance(shape, (tuple, list)) and len(shape) in (1, 3)
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ModelError(f"Input shape must be (H, W, C) of positive ints, got {_short(shape)}")
        self.shape = tuple(shape)

    def get_config(self):
        return {"shape": list(self.shape)}

    def output_shape(self, input_shape=None):
        return self.shape


class Conv2D(Layer):
    """2-D cross-correlation (no kernel flip, as Keras and PyTorch).

    out[n, i, j, f] = b[f] + sum_{u, v, c} xpad[n, i*s + u, j*s + v, c] * K[u, v, c, f]
    Output size per axis: floor((n + p_total - k) / s) + 1. Params: kh*kw*in*out + out.
    """
    type = "Conv2D"
    default_name = "conv2d"
    weight_params = ("kernel", "bias")

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None,
                 use_bias=True, name=None, trainable=True):
        super().__init__(name, trainable)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise ModelError(f"Conv2D filters must be a positive int, got {_short(filters)}")
        self.filters = filters
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        if min(self.kernel_size) < 1 or min(self.strides) < 1:
            raise ModelError(f"Conv2D kernel_size and strides must be >= 1, "
                             f"got {_short(kernel_size)}, {_short(strides)}")
        self.padding = _check_padding(padding, PADDINGS + ("explicit",))
        self.activation = _check_activation(activation)
        self.use_bias = bool(use_bias)
        if not self.use_bias:
            self.weight_params = ("kernel",)

    def get_config(self):
        return {"filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding,
                "activation": self.activation, "use_bias": self.use_bias}

    def pads(self, input_shape):
        """((top, bottom), (left, right)) for this input."""
        h, w = input_shape[:2]
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        return (pad_amounts(h, kh, sh, self.padding, 0), pad_amounts(w, kw, sw, self.padding, 1))

    def output_shape(self, input_shape):
        _need_image(self, input_shape, self.type)
        (pt, pb), (pl, pr) = self.pads(input_shape)
        h, w = input_shape[0] + pt + pb, input_shape[1] + pl + pr
        kh, kw = self.kernel_size
        if h < kh or w < kw:
            padded = "" if (h, w) == tuple(input_shape[:2]) else f" (padded {h}x{w})"
            raise ModelError(f"{self.type}: input {input_shape[0]}x{input_shape[1]}{padded} "
                             f"is smaller than kernel {kh}x{kw}")
        return (conv_output_size(input_shape[0], kh, self.strides[0], pt, pb),
                conv_output_size(input_shape[1], kw, self.strides[1], pl, pr), self.filters)

    def param_shapes(self, input_shape):
        shapes = {"kernel": (*self.kernel_size, input_shape[-1], self.filters)}
        if self.use_bias:
            shapes["bias"] = (self.filters,)
        return shapes


class _Pool2D(Layer):
    """Pooling over pool_size windows; strides default to pool_size.

    'same' pads as Conv2D 'same'; padded cells never win a max and are not
    counted in an average (Keras behaviour).
    """
    def __init__(self, pool_size=2, strides=None, padding="valid", name=None, trainable=True):
        super().__init__(name, trainable)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else _pair(strides, "strides")
        if min(self.pool_size) < 1 or min(self.strides) < 1:
            raise ModelError(f"{self.type} pool_size and strides must be >= 1")
        self.padding = _check_padding(padding, ("valid", "same"))

    def get_config(self):
        return {"pool_size": list(self.pool_size), "strides": list(self.strides),
                "padding": self.padding}

    pads = Conv2D.pads
    kernel_size = property(lambda self: self.pool_size)

    def output_shape(self, input_shape):
        _need_image(self, input_shape, self.type)
        (pt, pb), (pl, pr) = self.pads(input_shape)
        kh, kw = self.pool_size
        if input_shape[0] + pt + pb < kh or input_shape[1] + pl + pr < kw:
            raise ModelError(f"{self.type}: input {input_shape[0]}x{input_shape[1]} is smaller "
                             f"than pool {kh}x{kw}")
        return (conv_output_size(input_shape[0], kh, self.strides[0], pt, pb),
                conv_output_size(input_shape[1], kw, self.strides[1], pl, pr), input_shape[2])


class MaxPool2D(_Pool2D):
    """out[n, i, j, c] = max over the window of x."""
    type = "MaxPool2D"
    default_name = "max_pooling2d"


class AvgPool2D(_Pool2D):
    """out[n, i, j, c] = mean over the window's non-padded cells of x."""
    type = "AvgPool2D"
    default_name = "average_pooling2d"


class GlobalAvgPool2D(Layer):
    """(H, W, C) -> (C,): mean over all positions."""
    type = "GlobalAvgPool2D"
    default_name = "global_average_pooling2d"

    def output_shape(self, input_shape):
        _need_image(self, input_shape, self.type)
        return (input_shape[2],)


class GlobalMaxPool2D(GlobalAvgPool2D):
    """(H, W, C) -> (C,): max over all positions."""
    type = "GlobalMaxPool2D"
    default_name = "global_max_pooling2d"


class Flatten(Layer):
    """(H, W, C) -> (H*W*C,) in channels-last (Keras) order."""
    type = "Flatten"
    default_name = "flatten"

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)


class Dense(Layer):
    """y = activation(x @ W + b). Params: in*units + units."""
    type = "Dense"
    default_name = "dense"
    weight_params = ("kernel", "bias")

    def __init__(self, units, activation=None, use_bias=True, name=None, trainable=True):
        super().__init__(name, trainable)
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise ModelError(f"Dense units must be a positive int, got {_short(units)}")
        self.units = units
        self.activation = _check_activation(activation)
        self.use_bias = bool(use_bias)
        if not self.use_bias:
            self.weight_params = ("kernel",)

    def get_config(self):
        return {"units": self.units, "activation": self.activation, "use_bias": self.use_bias}

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ModelError(f"Dense: expects a flat input, got shape {tuple(input_shape)}; "
                             "add Flatten() or GlobalAvgPool2D() before it")
        return (self.units,)

    def param_shapes(self, input_shape):
        shapes = {"kernel": (input_shape[0], self.units)}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes


class Dropout(Layer):
    """Inverted dropout: in training y = x * mask / (1 - rate); identity at inference."""
    type = "Dropout"
    default_name = "dropout"

    def __init__(self, rate, name=None, trainable=True):
        super().__init__(name, trainable)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ModelError(f"Dropout rate must be in [0, 1), got {_short(rate)}")
        self.rate = float(rate)

    def get_config(self):
        return {"rate": self.rate}


class BatchNorm(Layer):
    """Batch normalization over the last (channel) axis.

    y = gamma * (x - mean) / sqrt(var + epsilon) + beta, with the batch's mean and
    (biased) variance in training and the moving statistics at inference.
    Keras convention: moving = momentum * moving + (1 - momentum) * batch_stat, so
    momentum=0.99 keeps 99% of the old value (PyTorch's momentum=0.01). The moving
    variance is updated with the unbiased batch variance, as PyTorch does.
    center=False: no beta (y has no offset); scale=False: no gamma (gamma = 1), as Keras.
    Params: 4*C (gamma, beta trainable; moving_mean, moving_variance not), C fewer for
    each of center/scale turned off.
    """
    type = "BatchNorm"
    default_name = "batch_normalization"
    state_params = ("moving_mean", "moving_variance")

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True, name=None,
                 trainable=True):
        super().__init__(name, trainable)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0 <= momentum < 1:
            raise ModelError(f"BatchNorm momentum must be in [0, 1), got {_short(momentum)}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon <= 0:
            raise ModelError(f"BatchNorm epsilon must be > 0, got {_short(epsilon)}")
        for what, v in (("center", center), ("scale", scale)):
            if not isinstance(v, bool):
                raise ModelError(f"BatchNorm {what} must be true or false, got {_short(v)}")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center, self.scale = center, scale
        self.weight_params = ("gamma",) * scale + ("beta",) * center

    def get_config(self):
        config = {"momentum": self.momentum, "epsilon": self.epsilon}
        if not (self.center and self.scale):   # files of models without them stay as before
            config.update(center=self.center, scale=self.scale)
        return config

    def param_shapes(self, input_shape):
        c = (input_shape[-1],)
        return {p: c for p in self.weight_params + self.state_params}


class Rescaling(Layer):
    """y = x * scale + offset (Keras' Rescaling), element-wise; no parameters.
    dy/dx = scale."""
    type = "Rescaling"
    default_name = "rescaling"

    def __init__(self, scale, offset=0.0, name=None, trainable=True):
        super().__init__(name, trainable)
        for what, v in (("scale", scale), ("offset", offset)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ModelError(f"Rescaling {what} must be a finite number, got {_short(v)}")
        self.scale, self.offset = float(scale), float(offset)

    def get_config(self):
        return {"scale": self.scale, "offset": self.offset}


class Activation(Layer):
    """Applies an activation element-wise (softmax over the last axis)."""
    type = "Activation"
    default_name = "activation"

    def __init__(self, activation, name=None, trainable=True):
        super().__init__(name, trainable)
        if activation is None:
            raise ModelError(f"Activation needs a name; allowed: {', '.join(ACTIVATIONS)}")
        self.activation = _check_activation(activation)

    def get_config(self):
        return {"activation": self.activation}


LAYER_TYPES = {cls.type: cls for cls in (Input, Conv2D, MaxPool2D, AvgPool2D, GlobalAvgPool2D,
                                         GlobalMaxPool2D, Flatten, Dense, Dropout, BatchNorm,
                                         Activation, Rescaling)}
# Keras spellings users already know.
ALIASES = {"InputLayer": "Input", "Convolution2D": "Conv2D", "MaxPooling2D": "MaxPool2D",
           "AveragePooling2D": "AvgPool2D", "AvgPooling2D": "AvgPool2D",
           "GlobalAveragePooling2D": "GlobalAvgPool2D", "GlobalMaxPooling2D": "GlobalMaxPool2D",
           "BatchNormalization": "BatchNorm"}
MaxPooling2D, AveragePooling2D, BatchNormalization = MaxPool2D, AvgPool2D, BatchNorm
GlobalAveragePooling2D, GlobalMaxPooling2D = GlobalAvgPool2D, GlobalMaxPool2D


def from_config(item: dict) -> Layer:
    """A layer from its description, in either shape:
    {"type": "Conv2D", "name": ..., "config": {"filters": 8, ...}} (what to_config writes,
    with "trainable": false for a frozen layer) or flat, {"type": "Conv2D", "filters": 8,
    "kernel_size": 3, ...}. Keras' class names are
    accepted. Unknown or missing arguments raise ModelError naming them."""
    if not isinstance(item, dict) or "type" not in item:
        raise ModelError(f"each layer must be an object with a 'type', got {_short(item)}")
    kind = item["type"]
    if not isinstance(kind, str):
        raise ModelError(f"a layer 'type' is a name such as 'Conv2D', got {_short(kind)}")
    kind = ALIASES.get(kind, kind)
    if kind not in LAYER_TYPES:
        close = difflib.get_close_matches(kind, list(LAYER_TYPES) + list(ALIASES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ModelError(f"unknown layer type {_short(item['type'])}{hint} (allowed: "
                         f"{', '.join(LAYER_TYPES)})")
    if "config" in item:
        config = item["config"]
        if not isinstance(config, dict):
            raise ModelError(f"{kind}: 'config' must be an object, got {_short(config)}")
        extra = sorted(set(item) - {"type", "name", "trainable", "config"})
        if extra:
            raise ModelError(f"{kind}: {', '.join(map(repr, extra))} belong(s) inside 'config' "
                             "(or write the layer flat, without 'config')")
    else:
        config = {k: v for k, v in item.items() if k not in ("type", "name", "trainable")}
    config = dict(config)
    name = item.get("name", config.pop("name", None))
    trainable = item.get("trainable", config.pop("trainable", True))
    cls = LAYER_TYPES[kind]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "name", "trainable")]
    unknown = [k for k in config if k not in allowed]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f" (allowed: {', '.join(allowed)})"
        raise ModelError(f"{kind}: unknown argument {_short(k)}{hint}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty
               and p not in config]
    if missing:
        raise ModelError(f"{kind}: missing required argument(s) {', '.join(map(repr, missing))}")
    return cls(**config, name=name, trainable=trainable)


def _short(value, limit=80) -> str:
    """repr(value), cut to `limit` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def to_config(layer: Layer) -> dict:
    """{"type", "name", "config"}, and "trainable": false for a frozen layer."""
    out = {"type": layer.type, "name": layer.name, "config": layer.get_config()}
    if not layer.trainable:
        out["trainable"] = False
    return out

"""Model: a list of layer descriptions, their shapes, and the weights.

The pure description that the engines run, the file format stores and training fits.
It knows nothing of engines, files or training; `cnnlab.api.Sequential` adds Keras'
fit/evaluate/predict/save on top of it.
"""
from __future__ import annotations

import json
import math

import numpy as np

from . import layers as L
from .layers import ModelError

FINAL_ACTIVATIONS = ("softmax", "sigmoid", "linear")


class Model:
    """A stack of layers, Keras style, and its weights.

    >>> model = Model([Input((28, 28, 1)), Conv2D(6, 3, padding="same", activation="relu"),
    ...                     MaxPool2D(), Flatten(), Dense(10, activation="softmax")])

    Attributes after construction:
      layers          the layers after the Input, each with a unique name
      input_shape     (H, W, C)
      layer_shapes    [(input_shape, output_shape)] per layer, channels-last
      weights         {"<layer>.<param>": float32 array in Keras layout}
      meta            class names, preprocessing, training summary (saved with the model)
    """

    def __init__(self, layers, name: str = "sequential", input_shape=None, init: bool = True):
        layers = list(layers)
        if layers and isinstance(layers[0], L.Input):
            if input_shape is not None:
                raise ModelError("give the input shape once: either Input(...) or input_shape=")
            input_shape = layers.pop(0).shape
        if input_shape is None:
            raise ModelError("the model needs an input shape: start with Input(shape=(H, W, C))")
        self.input_layer = L.Input(tuple(input_shape))
        for i, layer in enumerate(layers):
            if not isinstance(layer, L.Layer) or isinstance(layer, L.Input):
                raise ModelError(f"layer {i + 1}: expected a layer such as Conv2D or Dense, "
                                 f"got {layer!r}")
        if not layers:
            raise ModelError("the model has no layers after its Input")
        self.name = name
        self.layers = layers
        self._assign_names()
        self.layer_shapes = self._infer_shapes()
        self.weights: dict[str, np.ndarray] = {}
        self.meta: dict = {}
        self.fresh = True
        if init:
            self.init_weights(seed=0)

    # structure -------------------------------------------------------------
    @property
    def input_shape(self):
        return self.input_layer.shape

    @property
    def output_shape(self):
        return self.layer_shapes[-1][1]

    @property
    def num_classes(self) -> int:
        n = self.output_shape[-1]
        return 2 if (n == 1 and self.output_activation == "sigmoid") else n

    @property
    def final_activation_index(self):
        """Index of the layer whose softmax/sigmoid turns logits into probabilities
        (None when the model ends in plain logits). Engines compute the loss on the
        logits, before that activation, which is numerically stable."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if isinstance(layer, (L.Dropout, L.Flatten)):
                continue
            act = getattr(layer, "activation", "linear")
            return i if act in ("softmax", "sigmoid") else None
        return None

    @property
    def output_activation(self) -> str:
        """The activation applied after the logits: softmax, sigmoid or linear."""
        i = self.final_activation_index
        return "linear" if i is None else self.layers[i].activation

    def _assign_names(self):
        seen, counts = set(), {}
        for layer in self.layers:
            if layer.name is not None:
                if layer.name in seen:
                    raise ModelError(f"two layers are named {layer.name!r}")
                seen.add(layer.name)
        for layer in self.layers:
            if layer.name is None:
                base = layer.default_name
                while True:
                    k = counts.get(base, 0)
                    counts[base] = k + 1
                    cand = base if k == 0 else f"{base}_{k}"
                    if cand not in seen:
                        break
                layer.name = cand
                seen.add(cand)

    def _infer_shapes(self):
        shapes, shape = [], self.input_shape
        for i, layer in enumerate(self.layers, start=1):
            try:
                out = layer.output_shape(shape)
            except ModelError as e:
                raise ModelError(f"layer {i} {e}") from None
            if any(d < 1 for d in out):
                raise ModelError(f"layer {i} {layer.type}: output shape {out} is empty "
                                 f"(input {'x'.join(map(str, shape))})")
            shapes.append((tuple(shape), tuple(out)))
            shape = out
        return shapes

    def param_shapes(self) -> dict[str, tuple]:
        """"<layer>.<param>" -> shape, in layer order."""
        out = {}
        for layer, (in_shape, _) in zip(self.layers, self.layer_shapes):
            for pname, shape in layer.param_shapes(in_shape).items():
                out[f"{layer.name}.{pname}"] = tuple(shape)
        return out

    def trainable_names(self) -> list[str]:
        return [f"{layer.name}.{p}" for layer in self.layers for p in layer.trainable_params]

    def count_params(self) -> tuple[int, int, int]:
        """(total, trainable, non_trainable), as Keras counts them."""
        trainable = set(self.trainable_names())
        total = tr = 0
        for key, shape in self.param_shapes().items():
            n = math.prod(shape)
            total += n
            tr += n if key in trainable else 0
        return total, tr, total - tr

    # weights ---------------------------------------------------------------
    def init_weights(self, seed: int = 0):
        """Keras defaults: Glorot-uniform kernels, zero biases, BatchNorm gamma=1, beta=0,
        moving mean 0 and variance 1. limit = sqrt(6 / (fan_in + fan_out))."""
        rng = np.random.default_rng(seed)
        weights = {}
        for key, shape in self.param_shapes().items():
            pname = key.rsplit(".", 1)[1]
            if pname == "kernel":
                receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
                fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                weights[key] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
            elif pname in ("gamma", "moving_variance"):
                weights[key] = np.ones(shape, np.float32)
            else:
                weights[key] = np.zeros(shape, np.float32)
        self.weights = weights
        self.fresh = True   # fit() may reseed fresh weights; trained ones it continues from
        return self

    def set_weights(self, weights: dict):
        """Replace the weights, checking names and shapes."""
        expected = self.param_shapes()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ModelError(f"weights do not match the model: missing {missing or 'none'}, "
                             f"unexpected {extra or 'none'}")
        new = {}
        for key, shape in expected.items():
            arr = np.asarray(weights[key], dtype=np.float32)
            if arr.shape != shape:
                raise ModelError(f"weight {key}: shape {arr.shape} does not match the model's "
                                 f"{shape}")
            new[key] = arr
        self.weights = new
        self.fresh = False

    # (de)serialization -------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape),
                "layers": [L.to_config(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict, init: bool = True) -> "Model":
        if not isinstance(config, dict) or "layers" not in config:
            raise ModelError("a model description is an object with 'input_shape' and 'layers'")
        layer_list = config["layers"]
        if not isinstance(layer_list, list):
            raise ModelError("'layers' must be a list")
        built = []
        for i, item in enumerate(layer_list, start=1):
            try:
                built.append(L.from_config(item))
            except ModelError as e:
                raise ModelError(f"layer {i} {e}") from None
        return cls(built, name=config.get("name", "sequential"),
                   input_shape=config.get("input_shape"), init=init)

    def to_json(self, indent=2) -> str:
        return json.dumps(self.get_config(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Model":
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"not valid JSON: {e}") from None
        return cls.from_config(config)

    def copy(self, cls=None) -> "Model":
        """A deep copy (as `cls`, a Model subclass, when given)."""
        other = (cls or type(self)).from_config(self.get_config(), init=False)
        other.weights = {k: v.copy() for k, v in self.weights.items()}
        other.fresh = self.fresh
        other.meta = json.loads(json.dumps(self.meta))
        return other

    # reports -----------------------------------------------------------------
    def summary_rows(self) -> list[dict]:
        rows = []
        for layer, (in_shape, out_shape) in zip(self.layers, self.layer_shapes):
            rows.append({"name": layer.name, "type": layer.type,
                         "output_shape": [None, *out_shape],
                         "params": layer.count_params(in_shape)})
        return rows

    def summary_dict(self) -> dict:
        total, tr, non = self.count_params()
        return {"name": self.name, "input_shape": [None, *self.input_shape],
                "layers": self.summary_rows(), "total_params": total,
                "trainable_params": tr, "non_trainable_params": non}

    def __repr__(self):
        total = self.count_params()[0]
        return (f"{type(self).__name__}({len(self.layers)} layers, input {self.input_shape}, "
                f"{total:,} params)")

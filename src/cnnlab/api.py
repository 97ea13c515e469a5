"""The public model: `Sequential`, a `Model` description with Keras' methods on top.

    model = Sequential([Input((28, 28, 1)), Conv2D(6, 3, activation="relu"), ...])
    model.fit("mnist-5k", epochs=5); model.evaluate("mnist-5k"); model.predict(["7.png"])
    model.save("mine.safetensors"); again = load("mine.safetensors")
"""
from __future__ import annotations

from pathlib import Path

from . import fileformat, interop
from .console import summary_table
from .evaluate import evaluate as _evaluate
from .layers import Input, Layer, ModelError
from .losses import canonical
from .model import Model
from .predict import predict_proba
from .training import TrainConfig
from .training import fit as _fit


METRICS = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy",
           "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy")


class Sequential(Model):
    """A stack of layers, Keras style, that trains, evaluates, predicts and saves itself.

        model = Sequential([Input((28, 28, 1)), Flatten(), Dense(10, activation="softmax")])
        model = Sequential(); model.add(Input((28, 28, 1))); model.add(Flatten()); ...
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])

    Attributes: layers, input_shape, layer_shapes ([(in, out)] channels-last), weights
    ({"<layer>.<param>": float32 array in Keras layout}) and meta (class names,
    preprocessing, training summary; saved with the model)."""

    def __init__(self, layers=None, name: str = "sequential", input_shape=None,
                 init: bool = True):
        self._compiled: dict = {}
        self._pending = list(layers or [])
        self._pending_input = input_shape
        self.name = name
        if self._pending and (input_shape is not None or len(self._pending) > 1
                              or not isinstance(self._pending[0], Input)):
            super().__init__(self._pending, name=name, input_shape=input_shape, init=init)
            self._pending = None

    def __getattr__(self, attr):   # only reached while the model is not built yet
        if attr.startswith("__") or attr in ("_pending", "_pending_input", "_compiled"):
            raise AttributeError(attr)
        raise ModelError("the model has no layers yet: add an Input and a layer, "
                         "e.g. model.add(Input((28, 28, 1))); model.add(Flatten())")

    @classmethod
    def from_config(cls, config: dict, init: bool = True) -> "Sequential":
        """A model from cnnlab's description ({"input_shape", "layers": [...]}, each layer
        {"type", "name", "config"} or flat) or from Keras' `model.get_config()` /
        `to_json()` ({"class_name": "Sequential", "config": {...}})."""
        layers = config.get("layers") if isinstance(config, dict) else None
        if isinstance(config, dict) and "class_name" not in config and isinstance(layers, list) \
                and layers and isinstance(layers[0], dict) and "class_name" in layers[0]:
            config = {"class_name": "Sequential", "config": config}   # Sequential.get_config()
        if isinstance(config, dict) and "class_name" in config:
            model, _ = interop.model_from_keras_config(config)
            return model.copy(cls)
        return super().from_config(config, init=init)

    @property
    def built(self) -> bool:
        return self._pending is None

    def add(self, layer):
        """Append a layer (the first may be an Input), as Keras' Sequential.add. Weights of
        the layers already there are kept; the new layer's are initialized."""
        if not isinstance(layer, Layer):
            raise ModelError(f"add() takes a layer such as Conv2D or Dense, got {layer!r}")
        if self.built:
            if isinstance(layer, Input):
                raise ModelError("the model has its Input already; add() a layer after it")
            old, meta = dict(self.weights), self.meta
            Model.__init__(self, [self.input_layer, *self.layers, layer], name=self.name)
            self.weights.update({k: v for k, v in old.items() if k in self.weights
                                 and v.shape == self.weights[k].shape})
            self.meta = meta
            return
        pending = self._pending + [layer]
        has_input = (pending and isinstance(pending[0], Input)) or \
            self._pending_input is not None
        if has_input and any(not isinstance(p, Input) for p in pending):
            Model.__init__(self, pending, name=self.name, input_shape=self._pending_input)
            self._pending = None
        else:
            self._pending = pending

    def compile(self, optimizer="adam", loss="categorical_crossentropy", metrics=None, **kw):
        """Keep training settings for fit(), as Keras' compile: optimizer a name ('adam',
        'sgd', 'adamw', 'rmsprop') or {"name": ..., "lr"/"learning_rate": ..., ...}; loss a
        Keras loss name; metrics ['accuracy'] (accuracy and, over 5 classes, top-5 are always
        reported). Other keywords are fit() options (lr, momentum, schedule, ...)."""
        opts = dict(kw)
        if isinstance(optimizer, dict):
            o = dict(optimizer)
            opts["optimizer"] = o.pop("name", "adam")
            if "learning_rate" in o:
                o["lr"] = o.pop("learning_rate")
            opts.update(o)
        elif isinstance(optimizer, str):
            opts["optimizer"] = optimizer.lower()
        else:
            raise ModelError(f"optimizer must be a name such as 'adam' or a dict, got "
                             f"{optimizer!r}")
        if "learning_rate" in opts:
            opts["lr"] = opts.pop("learning_rate")
        opts["loss"] = canonical(loss)
        for m in metrics or []:
            if m not in METRICS:
                raise ModelError(f"unknown metric {m!r}; cnnlab reports accuracy (and top-5 "
                                 "accuracy over 5 classes): metrics=['accuracy']")
        TrainConfig.from_dict({k: v for k, v in opts.items()})   # unknown names fail now
        self._compiled = opts

    def summary(self, line_length=None, print_fn=None):
        """Print a Keras-style table: layer (type), output shape, parameter count.
        print_fn(line) receives the table (default: print); returns None as Keras does."""
        text = summary_table(self.summary_dict(), width=line_length or 88)
        (print_fn or print)(text)

    def predict(self, images, *, engine: str = "auto", batch_size: int = 256,
                mode: str = "auto"):
        """Class probabilities (N, classes) for images: uint8 (N, H, W, C) arrays, float
        arrays in [0, 1], a single image, or paths of image files. Files are converted as
        `cnnlab predict` converts them (mode 'auto', 'drawing' or 'resize')."""
        return predict_proba(self, images, engine=engine, batch_size=batch_size, mode=mode)

    def fit(self, x="mnist-5k", y=None, /, **options):
        """Train in place on a dataset name, a folder, a Dataset, or arrays: fit(x, y, ...)
        with uint8 images (N, H, W, C) (or floats in [0, 1]) and integer or one-hot labels.
        A new model starts from weights seeded by `seed`; a trained one continues.
        Options are those of `cnnlab.training.TrainConfig` (epochs, batch_size, optimizer,
        lr, schedule, loss, augment, val_split, early_stopping, seed, device, engine, out).
        Returns a History: `.history` {"loss": [...], "accuracy": [...], "val_loss": ...},
        `.epoch`; iterating gives one dict per epoch."""
        return _fit(self, x if y is None else (x, y), **{**self._compiled, **options})

    def evaluate(self, data="mnist-5k", *, engine: str = "auto", batch_size: int = 256):
        """Loss (the training loss), accuracy, per-class precision/recall/F1 and the
        confusion matrix on the test split (or on an (x, y) pair)."""
        return _evaluate(self, data, engine=engine, batch_size=batch_size)

    def save(self, path):
        """Write the model file (.safetensors: weights, description, meta), or a Keras 3
        file for a .keras path; returns the path written."""
        suffix = Path(path).suffix.lower()
        if suffix == ".keras":
            return interop.export_keras(self, path)
        if suffix not in ("", ".safetensors"):
            raise ModelError(f"{path}: cnnlab writes .safetensors model files (or .keras for "
                             f"Keras 3), not {suffix}; `cnnlab export` writes ONNX")
        return fileformat.save(self, path)


KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def load(path) -> Sequential:
    """Load a model file (.safetensors), a run directory's model, or a Keras model file
    (.keras, .h5: converted in memory, see `cnnlab import`)."""
    p = Path(path)
    if p.suffix.lower() in KERAS_SUFFIXES and p.is_file():
        return interop.load_keras(p).copy(Sequential)
    return fileformat.load(path, model_class=Sequential)

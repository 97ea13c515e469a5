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
from .model import Model
from .predict import predict_proba
from .training import fit as _fit


class Sequential(Model):
    """A stack of layers, Keras style, that trains, evaluates, predicts and saves itself.

    Attributes: layers, input_shape, layer_shapes ([(in, out)] channels-last), weights
    ({"<layer>.<param>": float32 array in Keras layout}) and meta (class names,
    preprocessing, training summary; saved with the model)."""

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
        return _fit(self, x if y is None else (x, y), **options)

    def evaluate(self, data="mnist-5k", *, engine: str = "auto", batch_size: int = 256):
        """Loss (the training loss), accuracy, per-class precision/recall/F1 and the
        confusion matrix on the test split (or on an (x, y) pair)."""
        return _evaluate(self, data, engine=engine, batch_size=batch_size)

    def save(self, path):
        """Write the model file (.safetensors: weights, description, meta); returns its path."""
        return fileformat.save(self, path)


KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def load(path) -> Sequential:
    """Load a model file (.safetensors), a run directory's model, or a Keras model file
    (.keras, .h5: converted in memory, see `cnnlab import`)."""
    p = Path(path)
    if p.suffix.lower() in KERAS_SUFFIXES and p.is_file():
        return interop.load_keras(p).copy(Sequential)
    return fileformat.load(path, model_class=Sequential)

"""The tutorials' architectures by name, each with its recommended training recipe.

    model = zoo.build("lenet")          # a Sequential
    recipe = zoo.recipe("lenet")        # optimizer, lr, epochs, batch size, augmentation...
"""
from __future__ import annotations

from .layers import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, Input,
                     MaxPool2D, ModelError, Rescaling)
from pathlib import Path

from .api import Sequential, load
from .fileformat import ModelFileError


def lenet(input_shape=(28, 28, 1), num_classes=10):
    """The MNIST notebook model: two 3x3 'same' convolutions with pooling, then Dense."""
    return [Input(input_shape),
            Conv2D(6, 3, padding="same", activation="relu"), MaxPool2D(),
            Conv2D(16, 3, padding="same", activation="relu"), MaxPool2D(),
            Flatten(), Dense(num_classes, activation="softmax")]


def lenet5(input_shape=(28, 28, 1), num_classes=10):
    """LeCun et al. 1998: 5x5 convolutions, average pooling, tanh, 120-84 dense layers.
    The 28x28 input is padded to 32x32 by the first convolution ('same')."""
    return [Input(input_shape),
            Conv2D(6, 5, padding="same", activation="tanh"), AvgPool2D(),
            Conv2D(16, 5, activation="tanh"), AvgPool2D(),
            Flatten(), Dense(120, activation="tanh"), Dense(84, activation="tanh"),
            Dense(num_classes, activation="softmax")]


def cifar_basic(input_shape=(32, 32, 3), num_classes=10):
    """conv32-conv32-pool-conv64-conv64-pool-dense256, all 3x3 'valid' (477,994 params)."""
    return [Input(input_shape),
            Conv2D(32, 3), Activation("relu"), Conv2D(32, 3), Activation("relu"),
            MaxPool2D(), Dropout(0.25),
            Conv2D(64, 3), Activation("relu"), Conv2D(64, 3), Activation("relu"),
            MaxPool2D(), Dropout(0.25),
            Flatten(), Dense(256), Activation("relu"), Dropout(0.5),
            Dense(num_classes), Activation("softmax")]


def cifar_improved(input_shape=(32, 32, 3), num_classes=10):
    """cifar-basic with two more convolutions (a 128-filter stage) and 'same' padding,
    trained with augmentation."""
    return [Input(input_shape),
            Conv2D(32, 3, padding="same", activation="relu"), Conv2D(32, 3, activation="relu"),
            MaxPool2D(), Dropout(0.25),
            Conv2D(64, 3, padding="same", activation="relu"), Conv2D(64, 3, activation="relu"),
            MaxPool2D(), Dropout(0.25),
            Conv2D(128, 3, padding="same", activation="relu"), Conv2D(128, 3, activation="relu"),
            MaxPool2D(), Dropout(0.25),
            Flatten(), Dense(256, activation="relu"), Dropout(0.5),
            Dense(num_classes, activation="softmax")]


def keras_cifar10(input_shape=(32, 32, 3), num_classes=10):
    """Keras' examples/cifar10_cnn.py."""
    return [Input(input_shape),
            Conv2D(32, 3, padding="same", activation="relu"), Conv2D(32, 3, activation="relu"),
            MaxPool2D(), Dropout(0.25),
            Conv2D(64, 3, padding="same", activation="relu"), Conv2D(64, 3, activation="relu"),
            MaxPool2D(), Dropout(0.25),
            Flatten(), Dense(512, activation="relu"), Dropout(0.5),
            Dense(num_classes, activation="softmax")]


def cifar_bn(input_shape=(32, 32, 3), num_classes=10):
    """Pairs of 3x3 'same' convolutions (32, 64, 128), each followed by BatchNorm,
    pooling after each pair, then Dense 1024 with dropout 0.2."""
    out = [Input(input_shape)]
    for f in (32, 64, 128):
        out += [Conv2D(f, 3, padding="same", activation="relu"), BatchNorm(),
                Conv2D(f, 3, padding="same", activation="relu"), BatchNorm(), MaxPool2D()]
    return out + [Flatten(), Dropout(0.2), Dense(1024, activation="relu"), Dropout(0.2),
                  Dense(num_classes, activation="softmax")]


def mnist_bn(input_shape=(28, 28, 1), num_classes=10):
    """A small BatchNorm CNN for 28x28 images (MNIST, Fashion-MNIST): 3x3 'same'
    convolutions 32-32, pool, 64-64, pool, each convolution without bias and followed by
    BatchNorm and ReLU, then Dropout and Dense (96,938 parameters, 96,554 trainable)."""
    out = [Input(input_shape)]
    for f in (32, 64):
        for _ in range(2):
            out += [Conv2D(f, 3, padding="same", use_bias=False), BatchNorm(), Activation("relu")]
        out.append(MaxPool2D())
    return out + [Flatten(), Dropout(0.3), Dense(num_classes), Activation("softmax")]


def mnist_fast(input_shape=(28, 28, 1), num_classes=10):
    """A narrow BatchNorm CNN for MNIST (99.3% in 34 s on a 2-core CPU with bf16, one seed):
    three 3x3 'same' convolutions (16, 32, 64 filters) without bias, each followed by
    BatchNorm, ReLU and 2x2 max-pooling, then Dense (about 2 million multiply-adds per
    image, a tenth of mnist-bn's)."""
    out = [Input(input_shape)]
    for f in (16, 32, 64):
        out += [Conv2D(f, 3, padding="same", use_bias=False), BatchNorm(), Activation("relu"),
                MaxPool2D()]
    return out + [Flatten(), Dense(num_classes), Activation("softmax")]


def litecnn(input_shape=(28, 28, 1), num_classes=10):
    """The drawing app's network: a 'full' convolution, a 'valid' one, pooling, dense."""
    return [Input(input_shape),
            Conv2D(32, 3, padding="full", activation="relu"),
            Conv2D(32, 3, activation="relu"), MaxPool2D(), Dropout(0.25),
            Flatten(), Dense(128, activation="relu"), Dropout(0.5),
            Dense(num_classes, activation="softmax")]


def airbench(input_shape=(32, 32, 3), num_classes=10, widths=(64, 256, 256)):
    """airbench94 (Keller Jordan's CIFAR-10 speed record, 94% in 10 epochs): a frozen 2x2
    whitening convolution (2 * 2*2*C filters, set from training patches by the recipe's
    `whiten`), GELU, three groups conv-pool-BN-GELU-conv-BN-GELU (3x3 'same' convolutions
    without bias; BatchNorm without gamma, momentum 0.6, epsilon 1e-12), max-pool 3, Dense
    without bias and logits scaled by 1/9 (1,971,328 trainable parameters for CIFAR-10)."""
    out = [Input(input_shape), Conv2D(8 * input_shape[2], 2, use_bias=False, trainable=False,
                                      name="whiten"), Activation("gelu")]

    def bn():
        return BatchNorm(momentum=0.6, epsilon=1e-12, scale=False)
    for w in widths:
        out += [Conv2D(w, 3, padding="same", use_bias=False), MaxPool2D(), bn(),
                Activation("gelu"), Conv2D(w, 3, padding="same", use_bias=False), bn(),
                Activation("gelu")]
    return out + [MaxPool2D(3), Flatten(), Dense(num_classes, use_bias=False),
                  Rescaling(1 / 9), Activation("softmax")]


# airbench94's hyperparameters, as training options (see TrainConfig and training/tricks.py)
AIRBENCH = dict(
    data="cifar10", epochs=10, batch_size=1024, standardize=True,
    optimizer="sgd", lr=11.5, momentum=0.85, nesterov=True, weight_decay=0.0153,
    decoupled=True, loss_reduction="sum",          # lr and decay per 1024 examples
    bias_lr=64.0,                                  # BatchNorm betas: lr x64, same decay/step
    label_smoothing=0.2,
    schedule="warmup_linear", warmup=0.23, lr_start=0.2, lr_end=0.07,
    lookahead={"every": 5, "decay": 0.95 ** 5, "power": 3.0},
    dirac_init=True, whiten={"images": 5000, "eps": 5e-4},
    augment={"flip": "alternate", "crop": 2, "fill": "reflect"},
    precision="auto",
)

_FLIP_SHIFT = {"translate": 0.1, "flip": True}
_CROP_FLIP = {"crop": 2, "flip": True, "fill": "reflect"}

# The tutorials' CIFAR-10 models, trained fast: AdamW with a one-cycle schedule, batch 256,
# label smoothing, 2-pixel reflect-padded crops and flips, bf16 where the CPU runs it.
# (4-pixel crops and lr 2e-3 left these dropout-heavy models underfitted: cifar-basic 77.2%
# in 20 epochs, cifar-improved 81.4% in 25.)
_FAST_CIFAR = dict(data="cifar10", optimizer="adamw", lr=3e-3, schedule="onecycle",
                   batch_size=256, label_smoothing=0.1, standardize=True, augment=_CROP_FLIP,
                   precision="auto")

# The BatchNorm CNNs for 28x28 images: SGD-Nesterov with a one-cycle schedule, batch 128,
# label smoothing, bf16 where the CPU runs it.
_SGD_28 = dict(data="mnist", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
               weight_decay=5e-4, schedule="onecycle", batch_size=128, label_smoothing=0.1,
               precision="auto")

MODELS = {
    # 1-pixel shifts: 99.2-99.3% on MNIST where unshifted images gave 98.9-99.0% (2-pixel
    # shifts together with label smoothing: 98.9%)
    "lenet": (lenet, dict(data="mnist-5k", optimizer="adam", lr=3e-3, schedule="cosine", epochs=15,
                          batch_size=32, augment={"crop": 1, "fill": "zero"},
                          description="the MNIST notebook model: two 3x3 convolutions")),
    "lenet5": (lenet5, dict(data="mnist-5k", optimizer="adam", lr=1e-3, epochs=10, batch_size=64,
                            description="classic LeNet-5 with tanh and average pooling")),
    "mnist-bn": (mnist_bn, dict(_SGD_28, epochs=8, augment={"crop": 1, "fill": "zero"},
                                description="small BatchNorm CNN for 28x28 images (MNIST, "
                                            "Fashion-MNIST)")),
    "mnist-fast": (mnist_fast, dict(_SGD_28, epochs=3,
                                    description="a narrow BatchNorm CNN for MNIST: over "
                                                "99% in 3 epochs")),
    "cifar-basic": (cifar_basic, dict(_FAST_CIFAR, epochs=28,
                                      description="the tutorial's CIFAR-10 basic model")),
    "cifar-improved": (cifar_improved, dict(_FAST_CIFAR, epochs=36,
                                            description="two more convolutions, trained with "
                                                        "augmentation")),
    "keras-cifar10": (keras_cifar10, dict(data="cifar10", optimizer="rmsprop", lr=1e-4,
                                          epochs=50, batch_size=32, augment=_FLIP_SHIFT,
                                          description="Keras' cifar10_cnn example")),
    "cifar-bn": (cifar_bn, dict(data="cifar10", optimizer="adam", lr=1e-3, epochs=30,
                                batch_size=128, standardize=True, augment=_FLIP_SHIFT,
                                description="conv 32-32-64-64-128-128 with BatchNorm")),
    "airbench": (airbench, dict(AIRBENCH, description="airbench94, the CIFAR-10 speed record "
                                                      "on a GPU")),
    "litecnn": (litecnn, dict(data="mnist-5k", optimizer="adam", lr=1e-3, epochs=10,
                              batch_size=64, description="drawn characters: 'full' + 'valid' "
                                                         "convolutions")),
}


# What the recipes measured (bench/bench_time_to_accuracy.py; every run is in
# bench/RESULTS.md): test accuracy (mean over the seeds), wall time including data loading,
# initialisation and every evaluation, and the machine. Shown by `cnnlab zoo`.
_EPYC = "2-core AMD EPYC (AVX512-BF16), bf16"
MEASURED: dict[str, dict] = {
    "lenet": dict(data="mnist", accuracy=0.9928, minutes=1.9, seeds=1, machine=_EPYC,
                  date="2026-12-02"),
    "mnist-bn": dict(data="mnist", accuracy=0.9952, minutes=4.2, seeds=1, machine=_EPYC,
                     date="2026-12-02"),
    "mnist-fast": dict(data="mnist", accuracy=0.9931, minutes=0.6, seeds=1, machine=_EPYC,
                       date="2026-12-02"),
    "cifar-basic": dict(data="cifar10", accuracy=0.8024, minutes=8.1, seeds=1, machine=_EPYC,
                        date="2026-12-02"),
    "cifar-improved": dict(data="cifar10", accuracy=0.8280, minutes=15.1, seeds=1,
                           machine=_EPYC, date="2026-12-02"),
    "airbench": dict(data="cifar10", accuracy=0.8961, tta_accuracy=0.9059, minutes=7.8,
                     seeds=3, machine="2-core Xeon (AMX), bf16", date="2026-12-02"),
}


def measured(name: str) -> dict | None:
    """A recipe's measured figures ({data, accuracy, tta_accuracy, minutes, seeds, machine,
    date}), or None where it has not been measured."""
    _lookup(name)
    m = MEASURED.get(name)
    return dict(m) if m else None


def names() -> list[str]:
    return list(MODELS)


def _lookup(name):
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; the zoo has: {', '.join(MODELS)}")
    return MODELS[name]


def build(name: str, input_shape=None, num_classes=None) -> Sequential:
    """A fresh zoo model, optionally for another input shape or class count."""
    fn, _ = _lookup(name)
    kwargs = {}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    return Sequential(fn(**kwargs), name=name)


def recipe(name: str) -> dict:
    """The recommended training settings (a copy)."""
    _, r = _lookup(name)
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in r.items()}


def load_any(arg) -> Sequential:
    """A model by name or path: a zoo name, a JSON description, a model file, a Keras file
    or a run directory (what the CLI's MODEL arguments take)."""
    path = Path(arg)
    if str(arg) in MODELS:
        return build(str(arg))
    if path.suffix == ".json" and path.is_file():
        return Sequential.from_json(path.read_text())
    if path.exists():
        return load(path)
    if path.suffix.lower() in (".json", ".safetensors", ".keras", ".h5", ".hdf5"):
        raise ModelFileError(f"{arg}: no such file")
    raise ModelFileError(f"{arg}: not a zoo model ({', '.join(MODELS)}), a .json description, "
                         f"a model file or a run directory")

"""Loss names and what each means for a model's output: one rule for both engines.

The engines compute every loss on the logits (before the final softmax/sigmoid),
which is numerically stable. `resolve_loss` turns a Keras loss name into one of:

    softmax_ce    softmax cross-entropy: -sum_k t_k log softmax(z)_k
    sigmoid_bce   binary cross-entropy on one sigmoid unit: -[t log s(z) + (1-t) log(1-s(z))]
    mse_probs     mean squared error between the probabilities (softmax(z), or s(z) for one
                  sigmoid unit) and the one-hot (or 0/1) targets

A model's evaluation loss is the loss it was trained with (`model.meta["loss"]`, default
categorical cross-entropy), without label smoothing, so `val_loss` in the history, the
model file's `test_loss` and `cnnlab evaluate` report the same number.
"""
from __future__ import annotations

LOSSES = ("categorical_crossentropy", "sparse_categorical_crossentropy",
          "binary_crossentropy", "mse")
ALIASES = {"mean_squared_error": "mse", "crossentropy": "categorical_crossentropy"}
KINDS = ("softmax_ce", "sigmoid_bce", "mse_probs")
DEFAULT = "categorical_crossentropy"


class LossError(ValueError):
    """A loss that does not fit the model's output; the message says what would."""


def canonical(loss: str) -> str:
    name = ALIASES.get(loss, loss)
    if name not in LOSSES:
        raise LossError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    return name


def resolve_loss(loss: str, model) -> str:
    """The kind of loss (softmax_ce, sigmoid_bce or mse_probs) that `loss` means for `model`.

    A softmax or linear output of K >= 2 units is a K-class classifier; one sigmoid unit a
    binary one. Other outputs (one linear unit, several sigmoid units) are refused."""
    name = canonical(loss)
    act, units = model.output_activation, model.output_shape[-1]
    if act == "sigmoid" and units > 1:
        raise LossError(f"a sigmoid output with {units} units means multi-label "
                        "classification, which cnnlab does not train; end with "
                        f"Dense({units}, activation='softmax')")
    if units == 1 and act != "sigmoid":
        raise LossError("a 1-unit output is a binary classifier only with a sigmoid: "
                        "Dense(1, activation='sigmoid'), or Dense(2, activation='softmax')")
    if name == "mse":
        return "mse_probs"
    if name == "binary_crossentropy" and act != "sigmoid":
        raise LossError("binary_crossentropy needs a 1-unit sigmoid output: "
                        "Dense(1, activation='sigmoid')")
    return "sigmoid_bce" if act == "sigmoid" else "softmax_ce"


def loss_of(model) -> str:
    """The loss a model was trained with (the default for an untrained one)."""
    return canonical((model.meta.get("loss") or DEFAULT))

"""What every engine offers, and what is written once for all of them.

The contract (NHWC float32 input, already preprocessed; weights in Keras layouts):

    forward(x, training=False)        -> logits (N, K): the network without its final
                                         softmax/sigmoid
    predict_proba(x, batch_size)      -> class probabilities (N, classes)
    activations(x)                    -> [(layer name, output)] for every layer at inference
    layer_output(x, i, pre_activation=False) -> the output of layer i (before its
                                         activation when pre_activation)
    vjp(x, out_layer, seed, wrt_layer=None, pre_activation=False)
                                      -> (out, d sum(out * seed) / d input or layer output)

A training backend adds train_step, evaluate, state/load_state (see cnnlab.training).
Written once here: the batch metrics (`Tally`), the class that logits predict and the
rank of the true class (`predicted_classes`, `true_class_rank`), and the evaluation loop
(`evaluate_logits`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .numpy.ops import loss_on_logits, sigmoid, softmax

ENGINES = ("auto", "torch", "numpy")


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def resolve_engine(engine: str) -> str:
    """'auto' -> 'torch' when PyTorch is installed, else 'numpy'; checks the name."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
    if engine == "auto":
        return "torch" if torch_available() else "numpy"
    if engine == "torch" and not torch_available():
        raise ValueError("the torch engine needs PyTorch, which is not installed; "
                         "use --engine numpy")
    return engine


def binary_output(model) -> bool:
    """One sigmoid unit: p = s(z) is the probability of class 1."""
    return model.output_shape[-1] == 1 and model.output_activation == "sigmoid"


def predicted_classes(model, logits: np.ndarray) -> np.ndarray:
    """The class the logits predict: z > 0 for one sigmoid unit, else the first argmax."""
    if binary_output(model):
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(1)


def true_class_rank(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-based rank of the true class among the logits, ties broken by index as argmax
    breaks them: rank = #{k: z_k > z_y} + #{k < y: z_k = z_y}. Top-k correct <=> rank < k,
    so top-1 equals accuracy and top-5 is never below it."""
    t = np.take_along_axis(logits, y[:, None], 1)
    before = np.arange(logits.shape[1])[None, :] < y[:, None]
    return (logits > t).sum(1) + ((logits == t) & before).sum(1)


@dataclass
class Tally:
    """Running sums of one epoch's (or one evaluation's) batch metrics."""
    loss_sum: float = 0.0   # sum over images of the batch-mean loss times batch size
    correct: int = 0
    top5: int = 0
    seen: int = 0

    def add(self, loss: float, n: int, correct: int, top5: int = 0):
        self.loss_sum += float(loss) * n
        self.correct += int(correct)
        self.top5 += int(top5)
        self.seen += int(n)

    def add_batch(self, model, loss: float, logits: np.ndarray, y: np.ndarray):
        """Count one batch from its logits (NumPy) and integer labels."""
        correct = int((predicted_classes(model, logits) == y).sum())
        top5 = int((true_class_rank(logits, y) < 5).sum()) if model.num_classes > 5 else 0
        self.add(loss, len(y), correct, top5)

    def __iadd__(self, other: "Tally"):
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.top5 += other.top5
        self.seen += other.seen
        return self

    def logs(self, with_top5: bool) -> dict:
        """{"loss", "accuracy"[, "top5_accuracy"]}: means over the images seen."""
        n = max(self.seen, 1)
        out = {"loss": self.loss_sum / n, "accuracy": self.correct / n}
        if with_top5:
            out["top5_accuracy"] = self.top5 / n
        return out

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d) -> "Tally":
        if isinstance(d, list):  # checkpoints written before the Tally had names
            return cls(float(d[0]), int(d[1]), int(d[2]), int(d[3]))
        return cls(**d)


def evaluate_logits(model, logits_of, x, y, loss_kind: str, batch_size: int = 512) -> dict:
    """The evaluation loop: logits_of(batch of x) -> logits as NumPy, the loss of kind
    `loss_kind` on them (NumPy engine's formulas, no label smoothing), counted in a Tally.
    Returns {"loss", "accuracy"[, "top5_accuracy"]}."""
    tally = Tally()
    y = np.asarray(y, np.int64)
    for i in range(0, len(y), batch_size):
        z = np.asarray(logits_of(x[i:i + batch_size]), np.float64)
        yb = y[i:i + batch_size]
        loss, _ = loss_on_logits(loss_kind, z, yb)
        tally.add_batch(model, loss, z, yb)
    return tally.logs(model.num_classes > 5)


def probabilities(model, logits: np.ndarray) -> np.ndarray:
    """Logits -> class probabilities: softmax (also for a linear output); for a sigmoid
    output s(z), and [1 - p, p] for one unit."""
    if model.output_activation == "sigmoid":
        p = sigmoid(logits)
        return np.concatenate([1 - p, p], axis=1) if p.shape[1] == 1 else p
    return softmax(logits)

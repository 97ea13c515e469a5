"""Engines run a model description: `torch` (fast, trains) and `numpy` (from scratch).

    engine = get_engine(model, "auto")   # torch when installed, else numpy
    probs = engine.predict_proba(x)      # x: preprocessed float32 (N, H, W, C)

Both offer forward (logits), predict_proba, activations and vjp (gradients).
"""
from __future__ import annotations

ENGINE_NAMES = ("auto", "torch", "numpy")


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def get_engine(model, engine: str = "auto", device: str = "cpu"):
    if engine not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINE_NAMES)}")
    if engine == "auto":
        engine = "torch" if torch_available() else "numpy"
    if engine == "torch":
        if not torch_available():
            raise ValueError("the torch engine needs PyTorch, which is not installed; "
                             "use --engine numpy")
        from .torch.engine import TorchEngine
        return TorchEngine(model, device=device)
    from .numpy.engine import NumpyEngine
    return NumpyEngine(model)

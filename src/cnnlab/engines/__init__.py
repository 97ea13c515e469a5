"""Engines run a model description: `torch` (fast, trains) and `numpy` (from scratch).

    engine = get_engine(model, "auto")   # torch when installed, else numpy
    probs = engine.predict_proba(x)      # x: preprocessed float32 (N, H, W, C)

The contract they meet, and what is written once for both, is in `engines.base`.
"""
from __future__ import annotations

from .base import ENGINES, resolve_engine, torch_available

ENGINE_NAMES = ENGINES
__all__ = ["ENGINES", "get_engine", "resolve_engine", "torch_available"]


def get_engine(model, engine: str = "auto", device: str = "cpu"):
    """An engine instance for `model`: 'auto', 'torch' or 'numpy'."""
    engine = resolve_engine(engine)
    if engine == "torch":
        from .torch.engine import TorchEngine
        return TorchEngine(model, device=device)
    from .numpy.engine import NumpyEngine
    return NumpyEngine(model)

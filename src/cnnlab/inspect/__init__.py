"""Look inside a trained CNN: figures one by one, or all of them as an HTML report.

    from cnnlab import inspect as ci
    cm, fig = ci.confusion_figure(y_true, y_pred, class_names)
    heat, fig = ci.occlusion(model, images, labels, patch=4, stride=2)
    imgs, acts, fig = ci.activation_maximization(model, "conv2d_1", range(8))
    path = ci.write_report("runs/demo", "mnist-5k")

Images are uint8 (N, H, W, C) arrays as datasets give them, or floats in [0, 1];
each function preprocesses them the way the model was trained. Every figure is a
`matplotlib.figure.Figure` (shown inline by Jupyter; `fig.savefig(path)` writes it).
"""
from __future__ import annotations

import importlib

# name -> submodule; loaded on first use, so `cnnlab report --help` needs no matplotlib
_WHERE = {"grad_cam": "attribution", "occlusion": "attribution", "saliency": "attribution",
          "confusion_figure": "figures", "feature_maps": "figures", "filters_figure": "figures",
          "per_class_figure": "figures", "per_class_metrics": "figures",
          "prediction_grid": "figures", "read_history": "figures", "top_losses": "figures",
          "training_curves": "figures", "activation_maximization": "maximize",
          "gaussian_blur": "maximize", "objective": "maximize", "write_report": "report"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

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
from .attribution import grad_cam, occlusion, saliency
from .figures import (confusion_figure, feature_maps, filters_figure, per_class_figure,
                      per_class_metrics, prediction_grid, read_history, top_losses,
                      training_curves)
from .maximize import activation_maximization, gaussian_blur, objective
from .report import write_report

__all__ = ["training_curves", "read_history", "confusion_figure", "per_class_figure",
           "per_class_metrics", "prediction_grid", "top_losses", "feature_maps",
           "filters_figure", "activation_maximization", "objective", "gaussian_blur",
           "occlusion", "saliency", "grad_cam", "write_report"]

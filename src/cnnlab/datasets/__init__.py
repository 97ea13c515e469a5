"""Image-classification datasets as uint8 arrays (no torch needed).

    ds = load("mnist")            # or "mnist-5k", "fashion-mnist", "cifar10", "emnist-letters", a folder
    ds.x_train, ds.y_train        # uint8 (N, H, W, C) channels-last, int64 (N,)
    list_datasets()               # what is available where, and what is missing
    load_image(path, (28, 28, 1)) # one file converted the way the training data was

Modules: registry (names, lookup, download), idx, cifar, emnist, folder,
images, download, cache, preprocess.
"""
from .base import Dataset, DatasetError, DatasetWarning
from .images import load_image
from .preprocess import channel_stats, to_float
from .registry import DATASETS, MIRRORS, data_dirs, list_datasets, load

__all__ = ["load", "list_datasets", "load_image", "Dataset", "DatasetError", "DatasetWarning",
           "to_float", "channel_stats", "DATASETS", "MIRRORS", "data_dirs"]

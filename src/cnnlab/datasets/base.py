"""The Dataset container and the one error type of `cnnlab.datasets`."""
from __future__ import annotations

import numpy as np


class DatasetError(Exception):
    """A data problem the user can fix; the message says what and where."""


class DatasetWarning(UserWarning):
    """Something was skipped while loading (for example an unreadable image)."""


class Dataset:
    """A train/test split of images and integer labels.

    x_train, x_test: uint8 (N, H, W, C), channels-last, C = 1 (grey) or 3 (RGB).
    y_train, y_test: int64 (N,), values in 0..num_classes-1.
    class_names: one name per label; source: the file or folder it came from.
    notes: what loading decided for the user (sizes, colour, split, conversions), for the
    training header to print.
    """

    def __init__(self, name, x_train, y_train, x_test, y_test, class_names, source):
        self.name = str(name)
        self.source = str(source)
        self.x_train = x_train
        self.y_train = y_train
        self.x_test = x_test
        self.y_test = y_test
        self.class_names = [str(c) for c in class_names]
        self.notes: list[str] = []
        where = f"{self.source}: " if self.source else ""
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 \
                    or x.shape[-1] not in (1, 3):
                raise DatasetError(f"{where}x_{split} must be uint8 (N, H, W, 1|3), got "
                                   f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise DatasetError(f"{where}y_{split} must be int64 ({x.shape[0]},), got "
                                   f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DatasetError(f"{where}train and test images differ in shape: "
                               f"{x_train.shape[1:]} vs {x_test.shape[1:]}")

    @property
    def input_shape(self) -> tuple:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, classes={self.num_classes}, source={self.source!r})")

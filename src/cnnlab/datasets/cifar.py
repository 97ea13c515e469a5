"""CIFAR-10, python version: `cifar-10-python.tar.gz`.

The archive holds `cifar-10-batches-py/` with `data_batch_1`..`data_batch_5`,
`test_batch` and `batches.meta`, each a pickle (protocol 2, Python 2 style).
A batch is a dict with b'data' (uint8 (N, 3072): 1024 R, 1024 G, 1024 B values,
each a 32x32 row-major plane) and b'labels' (list of int); batches.meta holds
b'label_names'. Members are read from the tar stream without extracting, and
unpickled by an unpickler that only knows how to rebuild numpy arrays.
"""
from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib

import numpy as np

from .base import DatasetError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, whatever its module
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def safe_unpickle(data: bytes, name: str):
    """Unpickle CIFAR batch bytes (encoding='bytes'); anything else is a DatasetError."""
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a bad pickle can raise almost anything
        raise DatasetError(f"{name}: not a valid CIFAR batch: {e}") from None


def _get(d, key: str):
    if not isinstance(d, dict):
        raise KeyError(key)
    return d[key.encode()] if key.encode() in d else d[key]


def _decode_batch(obj, name: str):
    try:
        data = _get(obj, "data")
        labels = np.asarray(_get(obj, "labels"), dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{name}: not a CIFAR batch (needs 'data' and 'labels')") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DatasetError(f"{name}: unexpected batch contents: data {getattr(data, 'shape', '?')}, "
                           f"labels {labels.shape}")
    # rows are [R plane | G plane | B plane] -> (N, 32, 32, 3)
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, labels


def read_cifar10(path) -> tuple:
    """(x_train, y_train, x_test, y_test, class_names) from cifar-10-python.tar.gz."""
    wanted = set(TRAIN_BATCHES) | {TEST_BATCH, META}
    found = {}
    name = str(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one pass over the stream
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{name}: cannot read archive (truncated or corrupt?): {e}") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DatasetError(f"{name}: archive lacks {', '.join(missing)} "
                           f"(expected cifar-10-batches-py/{{data_batch_1..5, test_batch, batches.meta}})")
    xs, ys = [], []
    for b in TRAIN_BATCHES:
        x, y = _decode_batch(safe_unpickle(found.pop(b), f"{name}:{b}"), f"{name}:{b}")
        xs.append(x)
        ys.append(y)
    x_test, y_test = _decode_batch(safe_unpickle(found.pop(TEST_BATCH), f"{name}:{TEST_BATCH}"),
                                   f"{name}:{TEST_BATCH}")
    meta = safe_unpickle(found.pop(META), f"{name}:{META}")
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, "label_names")]
    except (KeyError, TypeError, UnicodeDecodeError):
        raise DatasetError(f"{name}:{META}: no label_names") from None
    y_train = np.concatenate(ys)
    for y, split in ((y_train, "train"), (y_test, "test")):
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DatasetError(f"{name}: {split} label {int(y.max())} out of range for {len(names)} classes")
    return np.concatenate(xs), y_train, x_test, y_test, names

"""CIFAR-10, python version: `cifar-10-python.tar.gz`.

The archive holds `cifar-10-batches-py/` with `data_batch_1`..`data_batch_5`,
`test_batch` and `batches.meta`, each a pickle (protocol 2, Python 2 style).
A batch is a dict with b'data' (uint8 (N, 3072): 1024 R, 1024 G, 1024 B values,
each a 32x32 row-major plane) and b'labels' (list of int); batches.meta holds
b'label_names'. Members are read from the tar stream without extracting, and
unpickled by an unpickler that only knows how to rebuild numpy arrays.
"""
from __future__ import annotations

import io
import math
import pickle
import tarfile
import zlib

import numpy as np

from .base import DatasetError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"

MAX_BATCH_BYTES = 64 << 20   # a canonical batch pickle is 31 MB
MAX_META_BYTES = 1 << 20     # batches.meta is 158 bytes
MAX_MEMBERS = 1000           # tar members looked at before giving up
MAX_ARRAY_VALUES = 1 << 26   # values in one unpickled array
ARRAY_DTYPES = ("u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8")


class _Refused(pickle.UnpicklingError):
    pass


# The only calls a CIFAR pickle may make. They are what numpy writes for an array
# (numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b') followed by BUILD
# with (1, shape, dtype, is_fortran, raw bytes), numpy.dtype(name, False, True) followed
# by BUILD with its state) and what Python 3 writes for bytes at protocol 2
# (_codecs.encode(str, 'latin1')). Each is an object without attributes (__slots__ = ()),
# so BUILD cannot change it, and checks its arguments before anything is allocated.

class _Call:
    __slots__ = ()


class _NdarrayToken(_Call):
    """numpy.ndarray: only an argument of _reconstruct, never called."""
    __slots__ = ()

    def __call__(self, *args, **kwargs):
        raise _Refused("numpy.ndarray may only be used through numpy's _reconstruct")


class _Latin1(_Call):
    """_codecs.encode(text, 'latin1'): the bytes Python 3 pickles at protocol 2."""
    __slots__ = ()

    def __call__(self, text=None, encoding=None, *rest):
        if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused(f"_codecs.encode is allowed only as encode(str, 'latin1'), "
                           f"not with {type(text).__name__} and {str(encoding)[:20]!r}")
        return text.encode("latin1")


class _DType:
    """numpy.dtype(name, False, True) plus its BUILD state, checked; .numpy() is the dtype."""
    __slots__ = ("name", "order")

    def __init__(self, name, order="|"):
        self.name, self.order = name, order

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[1] in ("|", "<", ">", "=") and state[2:] == (None, None, None, -1, -1, 0)):
            raise _Refused(f"unexpected numpy dtype state {str(state)[:60]}")
        self.order = state[1]

    def numpy(self):
        return np.dtype(self.name).newbyteorder(self.order)


class _MakeDType(_Call):
    __slots__ = ()

    def __call__(self, name=None, align=False, copy=True, *rest):
        if rest or not isinstance(name, str) or name not in ARRAY_DTYPES or align is not False:
            raise _Refused(f"numpy.dtype({str(name)[:20]!r}) is not an integer array type")
        return _DType(name)


class _Array(np.ndarray):
    """The empty array _reconstruct makes; its __setstate__ checks the state first."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused("unexpected numpy array state")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and 1 <= len(shape) <= 2 and
                all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _Refused(f"array shape {str(shape)[:60]} is not 1 or 2 sizes")
        if not isinstance(dtype, _DType) or not isinstance(fortran, bool):
            raise _Refused("array without a plain integer dtype")
        count = math.prod(shape)
        dt = dtype.numpy()
        if count > MAX_ARRAY_VALUES:
            raise _Refused(f"array of shape {shape} is larger than {MAX_ARRAY_VALUES:,} values")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dt.itemsize:
            raise _Refused(f"array of shape {shape} {dt} needs {count * dt.itemsize} bytes, "
                           f"the pickle holds {len(raw) if isinstance(raw, (bytes, bytearray)) else 'none'}")
        super().__setstate__((1, shape, dt, fortran, bytes(raw)))


class _Reconstruct(_Call):
    """numpy's _reconstruct(numpy.ndarray, (0,), b'b'): an empty array to BUILD into."""
    __slots__ = ()

    def __call__(self, cls=None, shape=None, typecode=None, *rest):
        if rest or not isinstance(cls, _NdarrayToken) or shape != (0,) or typecode not in (b"b", "b"):
            raise _Refused("numpy _reconstruct is allowed only as _reconstruct(ndarray, (0,), b'b')")
        return np.ndarray.__new__(_Array, (0,), "b")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy", "ndarray"): _NdarrayToken(),
    ("numpy", "dtype"): _MakeDType(),
    ("_codecs", "encode"): _Latin1(),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"global {str(module)[:60]}.{str(name)[:60]} "
                                         "is not allowed") from None


def _plain(obj, depth=0):
    """The unpickled object with checked arrays turned into plain ndarrays."""
    if depth > 4:
        return obj
    if isinstance(obj, _Array):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return {k: _plain(v, depth + 1) for k, v in obj.items()}
    return obj


def safe_unpickle(data: bytes, name: str):
    """Unpickle CIFAR batch bytes (encoding='bytes'); anything else is a DatasetError."""
    try:
        return _plain(_ArrayUnpickler(io.BytesIO(data), encoding="bytes").load())
    except RecursionError:
        raise DatasetError(f"{name}: not a valid CIFAR batch: nested too deeply") from None
    except Exception as e:  # a bad pickle can raise almost anything
        raise DatasetError(f"{name}: not a valid CIFAR batch: {str(e)[:200]}") from None


def _get(d, key: str):
    if not isinstance(d, dict):
        raise KeyError(key)
    return d[key.encode()] if key.encode() in d else d[key]


def _decode_batch(obj, name: str):
    try:
        data = _get(obj, "data")
        labels = np.asarray(_get(obj, "labels"), dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError):
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
            for i, member in enumerate(tar):  # one pass over the stream
                if i >= MAX_MEMBERS:
                    raise DatasetError(f"{name}: more than {MAX_MEMBERS} members; not a CIFAR-10 archive")
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    cap = MAX_META_BYTES if base == META else MAX_BATCH_BYTES
                    if member.size > cap:
                        raise DatasetError(f"{name}:{base} is {member.size:,} bytes; a CIFAR-10 "
                                           f"{'batch' if base != META else 'meta file'} is at most "
                                           f"{cap:,}")
                    found[base] = tar.extractfile(member).read()  # member.size <= cap
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
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

"""IDX files, the format of MNIST, Fashion-MNIST and EMNIST.

Layout (big-endian): two zero bytes, a type byte (0x08 = uint8), a byte with
the number of dimensions, one uint32 per dimension, then the values row-major.
Image files have magic 2051 (0x00000803, dims N, rows, cols); label files have
magic 2049 (0x00000801, dims N). The canonical files are gzip-compressed.
"""
from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np

from .base import DatasetError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
CHUNK = 1 << 24


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    return data if data is not None else b""


def read_idx(src, name: str, magic: int) -> np.ndarray:
    """Decode an IDX file (path or binary file object, gzipped or not) into uint8.

    Checks the magic number, the header and that the body has exactly the
    size the header announces. Reads straight into the output array.
    """
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    own = not hasattr(src, "read")
    try:
        f = open(src, "rb") if own else src
    except OSError as e:
        raise DatasetError(f"{name}: cannot open: {e.strerror or e}") from None
    try:
        start = f.read(2)
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if start == b"\x1f\x8b" else f
        head = _read_exact(stream, 4)
        if len(head) < 4:
            raise DatasetError(f"{name}: file too short to be an IDX {kind} file")
        (found,) = struct.unpack(">I", head)
        if found != magic:
            raise DatasetError(f"{name}: not an IDX {kind} file (magic number {found}, expected {magic})")
        ndim = magic & 0xFF
        raw_dims = _read_exact(stream, 4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise DatasetError(f"{name}: truncated IDX header")
        dims = struct.unpack(f">{ndim}I", raw_dims)
        out = np.empty(dims, dtype=np.uint8)
        view, pos = memoryview(out).cast("B"), 0
        while pos < out.size:
            n = stream.readinto(view[pos:pos + CHUNK])
            if not n:
                break
            pos += n
        if pos != out.size or _read_exact(stream, 1):
            raise DatasetError(f"{name}: size mismatch: header says {dims} ({out.size} values), "
                               f"file has {'fewer' if pos != out.size else 'more'} (truncated or corrupt?)")
        return out
    except (EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{name}: cannot read (truncated or corrupt gzip file?): {e}") from None
    finally:
        if own:
            f.close()


def read_idx_images(src, name: str) -> np.ndarray:
    """(N, rows, cols) uint8 from an IDX image file (path or file object)."""
    return read_idx(src, name, IMAGES_MAGIC)


def read_idx_labels(src, name: str) -> np.ndarray:
    """(N,) int64 from an IDX label file (path or file object)."""
    return read_idx(src, name, LABELS_MAGIC).astype(np.int64)


def check_pair(images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str,
               num_classes: int | None = None) -> None:
    if len(images) != len(labels):
        raise DatasetError(f"{images_name} has {len(images)} images but {labels_name} has "
                           f"{len(labels)} labels")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise DatasetError(f"{labels_name}: label {int(labels.max())} out of range 0..{num_classes - 1}")


def write_idx(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (ndim 1 or 3); used for fixtures and exports."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()

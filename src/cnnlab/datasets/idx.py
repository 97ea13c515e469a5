"""IDX files, the format of MNIST, Fashion-MNIST and EMNIST.

Layout (big-endian): two zero bytes, a type byte (0x08 = uint8), a byte with
the number of dimensions, one uint32 per dimension, then the values row-major.
Image files have magic 2051 (0x00000803, dims N, rows, cols); label files have
magic 2049 (0x00000801, dims N). The canonical files are gzip-compressed.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib

import numpy as np

from .base import DatasetError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
CHUNK = 1 << 24
MAX_VALUES = 1 << 32   # values in one IDX file (EMNIST byclass train: 547 million)
MAX_GZIP_RATIO = 1100  # deflate expands at most ~1032x; a header promising more is a lie


def _source_size(f):
    """Size in bytes of a file object's whole content, or None if it cannot tell."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        pos = f.tell()
        end = f.seek(0, 2)
        f.seek(pos)
        return end
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    return data if data is not None else b""


def read_idx(src, name: str, magic: int) -> np.ndarray:
    """Decode an IDX file (path or binary file object, gzipped or not) into uint8.

    Checks the magic number, then the header's dimensions against the file size
    (exact for a plain file; for gzip, at most what deflate can expand to) before
    anything is allocated, and that the body has exactly the size announced.
    Memory grows with the data actually read, not with what the header claims.
    """
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    own = not hasattr(src, "read")
    try:
        f = open(src, "rb") if own else src
    except OSError as e:
        raise DatasetError(f"{name}: cannot open: {e.strerror or e}") from None
    try:
        size = _source_size(f)
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
        _check_dims(dims, name, kind, ndim, size, gzipped=stream is not f)
        count = math.prod(dims)
        buf = bytearray()
        while len(buf) < count:  # grows with what is really there, never past the header
            chunk = stream.read(min(CHUNK, count - len(buf)))
            if not chunk:
                break
            buf += chunk
        if len(buf) != count or _read_exact(stream, 1):
            raise DatasetError(f"{name}: size mismatch: header says {dims} ({count} values), "
                               f"file has {'fewer' if len(buf) != count else 'more'} "
                               "(truncated or corrupt?)")
        return np.frombuffer(buf, dtype=np.uint8).reshape(dims)
    except MemoryError:
        raise DatasetError(f"{name}: not enough memory to read it") from None
    except (EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{name}: cannot read (truncated or corrupt gzip file?): {e}") from None
    finally:
        if own:
            f.close()


def _check_dims(dims, name, kind, ndim, size, gzipped):
    """Compare the header's dimensions with the limits and the file size, before allocating."""
    count = math.prod(dims)
    if count == 0:
        raise DatasetError(f"{name}: header says {dims}: an IDX {kind} file without {kind}")
    need = 4 + 4 * ndim + count
    if size is not None and gzipped and need > size * MAX_GZIP_RATIO:
        raise DatasetError(f"{name}: header says {dims} ({count:,} values), more than a "
                           f"{size:,}-byte gzip file can hold (corrupt header?)")
    if size is not None and not gzipped and need != size:
        raise DatasetError(f"{name}: size mismatch: header says {dims} ({need:,} bytes with the "
                           f"header), the file has {size:,} bytes (truncated or corrupt?)")
    if count > MAX_VALUES:
        raise DatasetError(f"{name}: header says {dims} ({count:,} values); more than the "
                           f"{MAX_VALUES:,} read from one file")


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

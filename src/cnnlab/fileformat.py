"""The model file: one .safetensors file with the weights and JSON metadata.

Layout: safetensors' header carries `{"cnnlab": "<json>"}` in its metadata, where
the JSON holds the format version, the model description (`Model.get_config`),
the input shape, class names, preprocessing statistics and a training summary.
Tensors are named "<layer>.<param>" in Keras layout (float32). No pickle anywhere.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .atomic import atomic_writer
from .layers import ModelError
from .model import Model

FORMAT = "cnnlab-model"
FORMAT_VERSION = 1


class ModelFileError(Exception):
    """A file that is not a readable cnnlab model; the message names the file."""


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    with atomic_writer(path) as f:
        f.write(data)


def pack(tensors: dict, metadata: dict) -> bytes:
    """Serialize numpy arrays plus a JSON-able dict to safetensors bytes."""
    from safetensors.numpy import save
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return save(arrays, metadata={"cnnlab": json.dumps(metadata)})


def read_header(path) -> dict:
    """Parse and check the safetensors header; returns it. Raises ModelFileError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a model file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ModelFileError(f"{path}: not a safetensors file (bad header length)")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors file (header is not an object)")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ModelFileError(f"{path}: truncated: {size} bytes, the header promises {8 + n + end}")
    return header


def unpack(path) -> tuple[dict, dict]:
    """(tensors, metadata) from a file written by `pack`. Raises ModelFileError."""
    path = Path(path)
    header = read_header(path)
    meta_raw = (header.get("__metadata__") or {}).get("cnnlab")
    if meta_raw is None:
        raise ModelFileError(f"{path}: a safetensors file, but not a cnnlab file "
                             "(no cnnlab metadata)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: corrupted metadata (not JSON)") from None
    from safetensors.numpy import load_file
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ModelFileError(f"{path}: corrupted tensor data: {e}") from None
    return tensors, meta


def save(model, path) -> Path:
    """Write the model (weights + description + meta) atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else \
            path.with_suffix(".safetensors")
    metadata = {**model.meta, "format": FORMAT, "format_version": FORMAT_VERSION,
                "model": model.get_config(), "input_shape": list(model.input_shape)}
    atomic_write_bytes(path, pack(model.weights, metadata))
    return path


def load(path, model_class=Model):
    """Load a model file written by `save` (by either engine) as a `model_class`."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.exists():
            raise ModelFileError(f"{path}: a folder without model.safetensors")
        path = candidate
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    tensors, meta = unpack(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a cnnlab model file (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written by a newer cnnlab (format version "
                             f"{meta.get('format_version')}); upgrade cnnlab")
    try:
        model = model_class.from_config(meta["model"], init=False)
        model.set_weights(tensors)
    except (ModelError, KeyError) as e:
        raise ModelFileError(f"{path}: inconsistent model file: {e}") from None
    model.meta = {k: v for k, v in meta.items()
                  if k not in ("format", "format_version", "model", "input_shape")}
    return model

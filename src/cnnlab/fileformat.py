"""The model file: one .safetensors file with the weights and JSON metadata.

Layout: safetensors' header carries `{"cnnlab": "<json>", "cnnlab_sha256": "<hex>"}`
in its metadata, where the JSON holds the format version, the model description
(`Model.get_config`), the input shape, class names, preprocessing statistics
and a training summary. Tensors are named "<layer>.<param>" in Keras layout
(float32). No pickle anywhere.

Integrity: `cnnlab_sha256` is the SHA-256 of the header without that entry
(as canonical JSON: sorted keys, no spaces) followed by the tensor data, so a
changed byte anywhere (data, tensor table or metadata) is detected on load.
Files written before the checksum existed have none and still load.

Everything read is checked once, on load, before it is used; a file that
fails any check raises ModelFileError naming the file and the field. Limits
(a model file beyond them is refused): MAX_LAYERS layers, an input of at most
MAX_INPUT_PIXELS pixels and MAX_CHANNELS channels, at most MAX_ACTIVATION
values per image out of any layer, names of at most MAX_NAME characters.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .atomic import atomic_writer
from .layers import ModelError
from .model import Model

FORMAT = "cnnlab-model"
FORMAT_VERSION = 1
CHECKSUM_KEY = "cnnlab_sha256"

MAX_HEADER = 100 << 20       # bytes of safetensors header
MAX_TENSORS = 20_000         # entries in the tensor table (checkpoints hold ~4 per parameter)
MAX_LAYERS = 1000
MAX_INPUT_PIXELS = 4096 * 4096
MAX_CHANNELS = 64
MAX_ACTIVATION = 1 << 27     # values out of one layer for one image (512 MiB as float32)
MAX_NAME = 200               # characters in a layer, model or class name
MAX_DEPTH = 32               # nesting of the cnnlab metadata
QUOTE = 60                   # characters of a bad value quoted in an error

# safetensors dtype -> numpy dtype (little-endian)
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}


class ModelFileError(Exception):
    """A file that is not a readable cnnlab model; the message names the file."""


def _quote(value, limit: int = QUOTE) -> str:
    """repr(value), cut to about `limit` characters (a bad file's strings can be huge)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value):,} items>"
    try:
        text = repr(value)
    except RecursionError:
        text = f"<nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _clip(message: str, limit: int = 400) -> str:
    message = " ".join(str(message).split())  # one line
    return message if len(message) <= limit else message[:limit] + "..."


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    with atomic_writer(path) as f:
        f.write(data)


def _canonical(header: dict) -> bytes:
    """The header without its checksum entry, as canonical JSON bytes."""
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and CHECKSUM_KEY in meta:
        meta = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
        header = {**header, "__metadata__": meta}
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(header: dict, data) -> str:
    h = hashlib.sha256(_canonical(header))
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def pack(tensors: dict, metadata: dict) -> bytes:
    """Serialize numpy arrays plus a JSON-able dict to safetensors bytes, with the checksum."""
    from safetensors.numpy import save
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    raw = save(arrays, metadata={"cnnlab": json.dumps(metadata)})
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    header["__metadata__"][CHECKSUM_KEY] = _digest(header, data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {_quote(k)} appears twice")
        out[k] = v
    return out


def _parse_json(text, path, what):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ModelFileError(f"{path}: {what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"{path}: {what} is not valid JSON ({_clip(e, 120)})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_tensor_table(header: dict, path, size: int, n: int) -> dict:
    """{name: (dtype, shape, begin, end)} from the header's tensor entries, all checked."""
    table = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {_quote(name)}"
        if len(name) > 2 * MAX_NAME + 50:
            raise ModelFileError(f"{where}: name longer than {2 * MAX_NAME + 50} characters")
        if not isinstance(entry, dict):
            raise ModelFileError(f"{where}: entry must be an object, got {_quote(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFileError(f"{where}: unsupported dtype {_quote(dtype)} "
                                 f"(known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or len(shape) > 8 or \
                not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
            raise ModelFileError(f"{where}: shape must be a list of at most 8 non-negative ints, "
                                 f"got {_quote(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise ModelFileError(f"{where}: data_offsets must be [begin, end] with "
                                 f"0 <= begin <= end, got {_quote(offsets)}")
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ModelFileError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                                 f"bytes, shape {shape} of {dtype} needs {nbytes}")
        table[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    # the tensors must tile the data section exactly, without overlap or gaps
    pos = 0
    for name, (_, _, begin, end) in sorted(table.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            kind = "overlaps the previous one" if begin < pos else "leaves a gap before it"
            raise ModelFileError(f"{path}: tensor {_quote(name)}: data_offsets {kind}")
        pos = end
    data_len = size - 8 - n
    if pos > data_len:
        raise ModelFileError(f"{path}: truncated: {size} bytes, the header promises {8 + n + pos}")
    if pos < data_len:
        raise ModelFileError(f"{path}: {data_len - pos} unexpected bytes after the tensor data")
    return table


def read_header(path) -> dict:
    """Parse and check the safetensors header; returns it. Raises ModelFileError."""
    return _read(Path(path), with_data=False)[0]


def _read(path: Path, with_data: bool):
    """(header, tensor table, data bytearray or None); the data is read only after the
    header and its tensor table passed every check."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a model file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise ModelFileError(f"{path}: not a safetensors file (bad header length)")
            header, table = _parse_header(f.read(n), path, size, n)
            data = None
            if with_data:
                data = bytearray(size - 8 - n)
                if f.readinto(data) != len(data):
                    raise ModelFileError(f"{path}: truncated while reading")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    return header, table, data


def _parse_header(raw: bytes, path, size: int, n: int):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFileError(f"{path}: not a safetensors file (header is not JSON)") from None
    header = _parse_json(text, path, "the safetensors header")
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors file (header is not an object)")
    if len(header) > MAX_TENSORS + 1:
        raise ModelFileError(f"{path}: {len(header):,} tensors; at most {MAX_TENSORS:,} are read")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelFileError(f"{path}: header field __metadata__ must be an object of strings, "
                             f"got {_quote(meta)}")
    return header, _check_tensor_table(header, path, size, n)


def unpack(path, verify: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) from a file written by `pack`. Raises ModelFileError.

    The checksum, where the file has one, is verified unless verify=False.
    """
    path = Path(path)
    header, table, data = _read(path, with_data=True)
    meta_raw = header.get("__metadata__", {}).get("cnnlab")
    if meta_raw is None:
        raise ModelFileError(f"{path}: a safetensors file, but not a cnnlab file "
                             "(no cnnlab metadata)")
    expected = header["__metadata__"].get(CHECKSUM_KEY)
    if verify and expected is not None:
        if _digest(header, data) != expected.lower():
            raise ModelFileError(f"{path}: checksum mismatch: the file was changed or damaged "
                                 f"after it was saved (load(path, verify=False) loads it anyway)")
    meta = _parse_json(meta_raw, path, "the cnnlab metadata")
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: the cnnlab metadata must be an object, got "
                             f"{type(meta).__name__}")
    _check_depth(meta, path)
    buf = memoryview(data)
    tensors = {}
    for name, (dtype, shape, begin, end) in table.items():
        tensors[name] = np.frombuffer(buf[begin:end], dtype=DTYPES[dtype]).reshape(shape)
    return tensors, meta


def _check_depth(obj, path) -> None:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_DEPTH:
            raise ModelFileError(f"{path}: the cnnlab metadata is nested deeper than {MAX_DEPTH}")
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)


def _name_ok(v, optional=False) -> bool:
    return (optional and v is None) or (isinstance(v, str) and 0 < len(v) <= MAX_NAME)


def check_metadata(meta: dict, path) -> None:
    """Check the cnnlab metadata of a model file against its schema; ModelFileError naming
    the field on the first problem. Checks that need the built model are in `load`."""
    def bad(field, what, value):
        raise ModelFileError(f"{path}: metadata field {field} {what}, got {_quote(value)}")

    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a cnnlab model file (format {_quote(meta.get('format'))})")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        bad("format_version", "must be a positive int", version)
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written by a newer cnnlab (format version "
                             f"{version}); upgrade cnnlab")
    model = meta.get("model")
    if not isinstance(model, dict):
        bad("model", "must be an object (the model description)", model)
    if "name" in model and not _name_ok(model["name"]):
        bad("model.name", f"must be a string of 1 to {MAX_NAME} characters", model["name"])
    shape = model.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(d) and d >= 1 for d in shape):
        bad("model.input_shape", "must be [H, W, C] of positive ints", shape)
    if shape[0] * shape[1] > MAX_INPUT_PIXELS or shape[2] > MAX_CHANNELS:
        bad("model.input_shape", f"is beyond the limits ({MAX_INPUT_PIXELS:,} pixels, "
            f"{MAX_CHANNELS} channels)", shape)
    if "input_shape" in meta and meta["input_shape"] != shape:
        bad("input_shape", f"must equal model.input_shape {shape}", meta["input_shape"])
    layers = model.get("layers")
    if not isinstance(layers, list) or not layers:
        bad("model.layers", "must be a non-empty list", layers)
    if len(layers) > MAX_LAYERS:
        raise ModelFileError(f"{path}: metadata field model.layers has {len(layers):,} layers; "
                             f"at most {MAX_LAYERS:,} are allowed")
    for i, item in enumerate(layers):
        field = f"model.layers[{i}]"
        if not isinstance(item, dict):
            bad(field, "must be an object", item)
        if not isinstance(item.get("type"), str) or len(item["type"]) > MAX_NAME:
            bad(f"{field}.type", "must be a layer type name", item.get("type"))
        if not _name_ok(item.get("name"), optional=True):
            bad(f"{field}.name", f"must be a string of 1 to {MAX_NAME} characters", item.get("name"))
        if not isinstance(item.get("config", {}), dict):
            bad(f"{field}.config", "must be an object", item.get("config"))
        for key, value in item.get("config", {}).items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                bad(f"{field}.config.{_quote(key, 40)}", "must be finite", value)
    if "class_names" in meta:
        names = meta["class_names"]
        if not isinstance(names, list) or not all(_name_ok(n) for n in names):
            bad("class_names", f"must be a list of strings of 1 to {MAX_NAME} characters", names)
    if "preprocessing" in meta:
        prep = meta["preprocessing"]
        if not isinstance(prep, dict):
            bad("preprocessing", "must be an object with scale, mean and std", prep)
        if not _is_number(prep.get("scale")) or prep["scale"] <= 0:
            bad("preprocessing.scale", "must be a finite number > 0", prep.get("scale"))
        for key in ("mean", "std"):
            v = prep.get(key)
            if not isinstance(v, list) or len(v) not in (1, shape[2]) or \
                    not all(_is_number(x) for x in v):
                bad(f"preprocessing.{key}", f"must be a list of 1 or {shape[2]} finite numbers", v)
        if not all(s > 0 for s in prep["std"]):
            bad("preprocessing.std", "must hold numbers > 0", prep["std"])
    if "training" in meta and not isinstance(meta["training"], dict):
        bad("training", "must be an object", meta["training"])


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


def load(path, model_class=Model, verify: bool = True):
    """Load a model file written by `save` (by either engine) as a `model_class`.

    verify=False skips the checksum (to rescue a damaged file); every other check stays.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.exists():
            raise ModelFileError(f"{path}: a folder without model.safetensors")
        path = candidate
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    tensors, meta = unpack(path, verify=verify)
    check_metadata(meta, path)
    for name, arr in tensors.items():
        if arr.dtype != np.float32:
            raise ModelFileError(f"{path}: tensor {_quote(name)} is {arr.dtype}; model files "
                                 f"hold float32 (F32) only")
    try:
        model = model_class.from_config(meta["model"], init=False)
        for i, (layer, (_, out)) in enumerate(zip(model.layers, model.layer_shapes)):
            if math.prod(out) > MAX_ACTIVATION:
                raise ModelFileError(f"{path}: layer {i + 1} {layer.name} outputs "
                                     f"{'x'.join(map(str, out))} values per image; at most "
                                     f"{MAX_ACTIVATION:,} are allowed")
        model.set_weights(tensors)
    except (ModelError, KeyError, TypeError, ValueError, OverflowError) as e:
        raise ModelFileError(_clip(f"{path}: inconsistent model file: {e}")) from None
    names = meta.get("class_names")
    if names is not None and len(names) != model.num_classes:
        raise ModelFileError(f"{path}: metadata field class_names has {len(names)} names, the "
                             f"model has {model.num_classes} classes")
    model.meta = {k: v for k, v in meta.items()
                  if k not in ("format", "format_version", "model", "input_shape")}
    return model

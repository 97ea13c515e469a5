"""Keras' containers, read safely: the .keras zip in memory, HDF5 files, and the two
layouts of weights inside them (h5py, zipfile and json only; nothing is extracted).

  .keras       a zip: config.json (architecture), model.weights.h5, metadata.json
  Keras 3 weights        layers/<key>/vars/<i>, key = the class name in snake case plus a
                         counter (conv2d, conv2d_1, ...), i in creation order
  legacy (Keras 2) HDF5  [model_weights/]<layer name>/<weight path>, listed by the
                         `layer_names` and `weight_names` attributes
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

from .errors import InteropError

MAX_JSON_BYTES = 16 << 20          # an architecture is a few kB
MAX_WEIGHT_BYTES = 2 << 30         # the weights file inside a .keras zip


def h5py_module():
    try:
        import h5py
    except ImportError:
        raise InteropError("reading Keras files needs h5py: pip install 'cnnlab[interop]'") \
            from None
    return h5py


def read_json(raw, what):
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InteropError(f"{what} is not UTF-8 text") from None
    if len(raw) > MAX_JSON_BYTES:
        raise InteropError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MB")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InteropError(f"{what} is not valid JSON: {e}") from None


def _safe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not (name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name)
                or "\x00" in name)


def _read_member(z, name, limit):
    info = z.getinfo(name)
    if info.file_size > limit:
        raise InteropError(f"{name} inside the zip claims {info.file_size:,} bytes "
                           f"(limit {limit:,})")
    with z.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InteropError(f"{name} inside the zip unpacks past {limit:,} bytes")
    return data


def read_keras_zip(path: Path):
    """(config, h5 file object, metadata) from a .keras zip, read in memory."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InteropError(f"{path}: not a .keras file (not a zip archive, or truncated)") \
            from None
    with z:
        names = z.namelist()
        bad = [n for n in names if not _safe_member(n)]
        if bad:
            raise InteropError(f"{path}: refused: the zip holds an unsafe member name "
                               f"{bad[0]!r} (absolute or with '..')")
        if "config.json" not in names:
            raise InteropError(f"{path}: not a Keras 3 .keras file (no config.json in the zip)")
        try:
            config = read_json(_read_member(z, "config.json", MAX_JSON_BYTES), "config.json")
            metadata = {}
            if "metadata.json" in names:
                metadata = read_json(_read_member(z, "metadata.json", MAX_JSON_BYTES),
                                 "metadata.json")
            if "model.weights.h5" not in names:
                if "model.weights.json" in names:
                    raise InteropError(f"{path}: sharded weights are not supported")
                raise InteropError(f"{path}: the .keras file holds no model.weights.h5")
            data = _read_member(z, "model.weights.h5", MAX_WEIGHT_BYTES)
        except (zipfile.BadZipFile, EOFError, OSError) as e:  # bad CRC, truncated member
            raise InteropError(f"{path}: damaged zip archive: {e}") from None
    try:
        h5 = h5py_module().File(io.BytesIO(data), "r")
    except OSError:
        raise InteropError(f"{path}: model.weights.h5 inside is not a readable HDF5 file "
                           "(damaged or truncated)") from None
    return config, h5, metadata if isinstance(metadata, dict) else {}


def open_h5(path: Path):
    try:
        return h5py_module().File(path, "r")
    except OSError:
        raise InteropError(f"{path}: not a readable HDF5 file (damaged or truncated)") from None


def _attr_str(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# weights stores -------------------------------------------------------------------------
def _roles(entry) -> list[str]:
    """The weight names of a Keras layer, in Keras' creation order."""
    cls, cfg = entry["class_name"], entry["config"]
    if cls in ("Conv2D", "Dense"):
        return ["kernel"] + (["bias"] if cfg.get("use_bias", True) else [])
    if cls == "BatchNormalization":
        return ((["gamma"] if cfg.get("scale", True) else [])
                + (["beta"] if cfg.get("center", True) else [])
                + ["moving_mean", "moving_variance"])
    return []


def snake_case(name):
    """Keras' key for a class: Conv2D -> conv2d, BatchNormalization -> batch_normalization."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


class _Keras3Store:
    """Keras 3 weights (model.weights.h5 / *.weights.h5): layers/<key>/vars/<i>."""

    def __init__(self, h5, entries):
        self.group = h5["layers"]
        self.keys, used = {}, {}
        for e in entries:  # the key is the class name, not the layer name
            base = snake_case(e["real_class"])
            k = used.get(base)
            used[base] = 0 if k is None else k + 1
            self.keys[e["name"]] = base if k is None else f"{base}_{k + 1}"

    def get(self, entry):
        roles = _roles(entry)
        key = self.keys.get(entry["name"])
        vars_ = self.group.get(f"{key}/vars") if key and key in self.group else None
        n = len(vars_) if vars_ is not None else 0
        if n != len(roles):
            raise InteropError(f"layer {entry['name']!r}: the weights file holds {n} arrays "
                               f"for it under layers/{key}, the architecture needs "
                               f"{len(roles)} ({', '.join(roles)})")
        return {role: vars_[str(i)] for i, role in enumerate(roles)}


class _LegacyStore:
    """Keras 2 / tf.keras HDF5 weights: <group>/<layer name>/<weight path>, listed in the
    group's `layer_names` and each layer's `weight_names` attributes."""

    def __init__(self, group):
        self.group = group
        self.names = {_attr_str(n) for n in group.attrs.get("layer_names", [])}

    def get(self, entry):
        roles = _roles(entry)
        name = entry["name"]
        if name not in self.names or name not in self.group:
            if not roles:
                return {}
            raise InteropError(f"layer {name!r}: no weights for it in the weights file")
        g = self.group[name]
        out = {}
        for wname in g.attrs.get("weight_names", []):
            wname = _attr_str(wname)
            role = wname.rsplit("/", 1)[-1].split(":")[0]
            if role in roles:
                if wname not in g:
                    raise InteropError(f"layer {name!r}: weight {wname!r} is listed but absent")
                out[role] = g[wname]
        missing = [r for r in roles if r not in out]
        if missing:
            raise InteropError(f"layer {name!r}: the weights file lacks {', '.join(missing)}")
        return out


def store_for(h5, entries, what):
    if "layers" in h5 and "layer_names" not in h5.attrs:
        return _Keras3Store(h5, entries)
    if "model_weights" in h5:
        return _LegacyStore(h5["model_weights"])
    if "layer_names" in h5.attrs:
        return _LegacyStore(h5)
    raise InteropError(f"{what}: no Keras weights in this HDF5 file (neither layers/ nor "
                       "model_weights/ nor layer_names)")


# sniffing ------------------------------------------------------------------------------
def is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def is_h5(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"

"""Cache of decoded arrays, so the second load of a dataset is fast.

An entry is a folder `<root>/<slug>-<key>/` holding one uncompressed `.npy`
per array and `meta.json`. The key hashes the source files' paths, sizes and
mtimes plus the decoding options, so a changed source gets a new entry (and
the stale one is removed). Entries are written to a temporary folder and
renamed into place, so a reader never sees half an entry (a folder left by a
killed writer is removed by a later save, see `cnnlab.atomic`). Roots are tried in
order (normally `<data dir>/.cache`, then `~/.cache/cnnlab/decoded`); a
read-only root is skipped. Any cache problem just means decoding again, and a
damaged entry is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import clean_stale_temp_files, temp_prefix

CACHE_VERSION = 1
CACHE_MAX_BYTES = 4 << 30  # bigger decoded datasets are not cached


def home_dir() -> Path:
    """~/.cache/cnnlab: the last data dir in the lookup order."""
    return Path.home() / ".cache" / "cnnlab"


def writable_dir(d) -> bool:
    """Whether d (or, if absent, its nearest existing parent) may be written to.

    A folder with no write permission bits counts as read-only even for root,
    so shared read-only data dirs are left untouched.
    """
    p = Path(d)
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    try:
        st = p.stat()
    except OSError:
        return False
    return p.is_dir() and bool(st.st_mode & 0o222) and os.access(p, os.W_OK | os.X_OK)


def default_roots(data_dir=None) -> list:
    roots = [Path(data_dir) / ".cache"] if data_dir is not None else []
    try:
        roots.append(home_dir() / "decoded")
    except RuntimeError:  # no home directory
        pass
    return roots


def stamp(paths) -> list:
    """[path, size, mtime_ns] for each source file: the part of the key that changes."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def make_key(source: str, sources_stamp: list, options: dict) -> str:
    blob = json.dumps([CACHE_VERSION, source, sources_stamp, options], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load(roots, slug: str, key: str):
    """(arrays dict, meta dict) from the first root holding the entry, or None."""
    for root in roots:
        entry = Path(root) / f"{slug}-{key}"
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if meta.get("key") != key:
                continue
        except (OSError, ValueError):
            continue
        try:
            arrays = {n: np.load(entry / f"{n}.npy", allow_pickle=False) for n in meta["arrays"]}
            return arrays, meta
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            shutil.rmtree(entry, ignore_errors=True)  # damaged: drop it so it can be rebuilt
            continue
    return None


def _write_npy(path: Path, arr: np.ndarray) -> None:
    # no fsync: an entry cut short by a crash fails to load and is then rebuilt
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def save(roots, slug: str, key: str, arrays: dict, meta: dict) -> Path | None:
    """Write an entry to the first writable root; return its folder or None."""
    if sum(a.nbytes for a in arrays.values()) > CACHE_MAX_BYTES:
        return None
    meta = dict(meta, key=key, arrays=list(arrays), version=CACHE_VERSION)
    for root in roots:
        root = Path(root)
        tmp = None
        if not writable_dir(root):
            continue
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_stale_temp_files(root)  # folders left by a killed writer
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=temp_prefix(), suffix=f"-{slug}-{key}"))
            os.chmod(tmp, 0o755)
            for name, arr in arrays.items():
                _write_npy(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            (tmp / "meta.json").write_text(json.dumps(meta))
            entry = root / f"{slug}-{key}"
            try:
                os.rename(tmp, entry)
            except OSError:  # another process wrote it first
                shutil.rmtree(tmp, ignore_errors=True)
            _prune(root, slug, key, meta)
            return entry
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            continue
    return None


def _prune(root: Path, slug: str, key: str, meta: dict) -> None:
    """Remove entries of the same source and options with an older key."""
    for other in root.glob(f"{slug}-*"):
        if other.name == f"{slug}-{key}" or not other.is_dir():
            continue
        try:
            m = json.loads((other / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if m.get("source") == meta.get("source") and m.get("options") == meta.get("options"):
            shutil.rmtree(other, ignore_errors=True)

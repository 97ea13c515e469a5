"""EMNIST, the gzip IDX release (`gzip.zip` from NIST).

The zip holds `gzip/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz`
and `gzip/emnist-<split>-mapping.txt` for the splits balanced, byclass, bymerge,
digits, letters and mnist. Images are stored transposed relative to MNIST, so
they are transposed back here. Each mapping line is `label code [code]` with
ASCII codes; the letters split has labels 1..26 and two codes per line
(upper and lower case merged). Labels are renumbered 0..K-1 in mapping order
and class names are the characters, joined with '/' when a class has two.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from .base import DatasetError
from .idx import check_pair, read_idx_images, read_idx_labels

SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
ZIP_NAME = "gzip.zip"


def split_files(split: str) -> list:
    p = f"emnist-{split}"
    return [f"{p}-train-images-idx3-ubyte.gz", f"{p}-train-labels-idx1-ubyte.gz",
            f"{p}-test-images-idx3-ubyte.gz", f"{p}-test-labels-idx1-ubyte.gz",
            f"{p}-mapping.txt"]


def parse_mapping(text: str, name: str) -> tuple:
    """(sorted label values, class names) from a mapping file's text."""
    labels, names = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [int(p) for p in parts]
            if len(values) < 2:
                raise ValueError
            chars = [chr(c) for c in values[1:]]
        except (ValueError, OverflowError):
            raise DatasetError(f"{name}: line {n} is not 'label ascii_code [ascii_code]': "
                               f"{line[:60]!r}{'...' if len(line) > 60 else ''}") from None
        labels.append(values[0])
        names.append("/".join(chars))
    if not labels or len(set(labels)) != len(labels):
        raise DatasetError(f"{name}: empty mapping or repeated labels")
    order = np.argsort(labels, kind="stable")
    return np.asarray(labels, dtype=np.int64)[order], [names[i] for i in order]


def _relabel(y: np.ndarray, values: np.ndarray, name: str) -> np.ndarray:
    idx = np.searchsorted(values, y)
    idx = np.clip(idx, 0, len(values) - 1)
    bad = values[idx] != y
    if bad.any():
        raise DatasetError(f"{name}: label {int(y[bad][0])} is not in the mapping file")
    return idx.astype(np.int64)


def _decode(split: str, opener, where: str) -> tuple:
    files = split_files(split)
    mapping = opener(files[4]).read().decode("ascii", errors="replace")
    values, names = parse_mapping(mapping, f"{where}:{files[4]}")
    out = []
    for img_f, lab_f in ((files[0], files[1]), (files[2], files[3])):
        x = read_idx_images(opener(img_f), f"{where}:{img_f}")
        y = read_idx_labels(opener(lab_f), f"{where}:{lab_f}")
        check_pair(x, y, img_f, lab_f)
        x = np.ascontiguousarray(x.transpose(0, 2, 1))[..., None]  # stored transposed
        out += [x, _relabel(y, values, f"{where}:{lab_f}")]
    return (*out, names)


def read_emnist_dir(split: str, folder: Path) -> tuple:
    """(x_train, y_train, x_test, y_test, class_names) from extracted files in folder."""
    return _decode(split, lambda f: io.BytesIO((folder / f).read_bytes()), str(folder))


def read_emnist_zip(split: str, zip_path: Path) -> tuple:
    """Same as read_emnist_dir, reading the members straight out of gzip.zip."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = {m.rsplit("/", 1)[-1]: m for m in zf.namelist()}
            missing = [f for f in split_files(split) if f not in members]
            if missing:
                raise DatasetError(f"{zip_path}: archive lacks {', '.join(missing)}")

            def opener(f):
                return io.BytesIO(zf.read(members[f]))
            return _decode(split, opener, str(zip_path))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DatasetError(f"{zip_path}: cannot read zip archive (truncated or corrupt?): {e}") from None

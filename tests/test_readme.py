"""Every Python snippet of the README runs as pasted (in order, in one session, as a
reader would run them), in a fresh folder holding the image file the snippets name."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATASETS

ROOT = Path(__file__).resolve().parents[1]


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_python_snippets():
    assert len(python_blocks()) >= 3


@pytest.mark.skipif(not (SHARED_DATASETS / "cifar10").is_dir(),
                    reason=f"the README loads CIFAR-10; not found in {SHARED_DATASETS}")
def test_every_python_snippet_runs_as_pasted(tmp_path):
    pytest.importorskip("keras")
    pytest.importorskip("onnxruntime")
    from cnnlab import datasets
    digit = datasets.load("mnist-5k").x_test[0, :, :, 0]
    Image.fromarray(255 - digit).resize((120, 120)).save(tmp_path / "digit.png")  # ink on paper
    runner = ["import subprocess, sys, traceback",
              "blocks = " + repr(python_blocks()), "ns = {}",
              "for i, code in enumerate(blocks):",
              "    if 'digits.onnx' in code:  # after the README's `cnnlab export` line",
              "        subprocess.run([sys.executable, '-m', 'cnnlab.cli', 'export',",
              "                        'mine.safetensors', '--format', 'onnx', '-o',",
              "                        'digits.onnx'], check=True)",
              "    print(f'--- block {i + 1}', flush=True)",
              "    exec(compile(code, f'README block {i + 1}', 'exec'), ns)"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CNNLAB_DATA": str(SHARED_DATASETS),
           "KERAS_BACKEND": "torch", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-c", "\n".join(runner)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("--- block") == len(python_blocks())
    assert (tmp_path / "mine.safetensors").exists() and (tmp_path / "digits.keras").exists()
    assert np.isfinite([float(w) for w in r.stdout.split() if re.fullmatch(r"0\.\d+", w)]).all()

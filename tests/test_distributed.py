"""Data-parallel training: 2 ranks on 127.0.0.1 equal one process with the same global
batch; SyncBatchNorm equals one process, plain BatchNorm is close; only rank 0 writes;
a killed rank or Ctrl-C stops every rank and the run resumes bit-exactly; --nproc 1 is
the one-process path.

Run as a script, this file is the worker the 2-rank tests start through
torch.distributed.run: `python -m torch.distributed.run ... test_distributed.py SPEC`.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
OPTS = dict(epochs=2, batch_size=15, optimizer="sgd", lr=0.1, momentum=0.9, seed=4,
            verbose=0, data="arrays")


def arrays(n=70, n_test=30):
    """Bright, dark and striped 8x8 grey images with some noise: 3 learnable classes."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, n + n_test)
    x = rng.normal(110, 30, (n + n_test, 8, 8, 1))
    x[y == 0] += 60
    x[y == 1] -= 60
    x[y == 2, :, ::2] += 70
    x = np.clip(x, 0, 255).astype(np.uint8)
    from cnnlab.datasets import Dataset
    return Dataset("arrays", x[:n], y[:n], x[n:], y[n:], ["a", "b", "c"], "test")


def net(batchnorm=False):
    from cnnlab import Sequential
    from cnnlab.layers import BatchNorm, Conv2D, Dense, Flatten, Input, MaxPool2D
    return Sequential([Input((8, 8, 1)), Conv2D(4, 3, activation="relu")]
                      + ([BatchNorm()] if batchnorm else [])
                      + [MaxPool2D(), Flatten(), Dense(3, activation="softmax")])


def worker(spec_path):
    """Each job of the spec trains in this process group; rank 0 saves weights, history
    and (for every rank) the list of files the run wrote."""
    import torch
    torch.set_num_threads(1)
    from cnnlab.training import distributed, fit, run
    world = distributed.init_from_env("cpu")
    writes = []
    real_write = run.atomic_write_bytes
    run.atomic_write_bytes = lambda path, data: (writes.append(Path(path).name),
                                                 real_write(path, data))
    spec = json.loads(Path(spec_path).read_text())
    for job in spec["jobs"]:
        writes.clear()
        model = net(job["batchnorm"])
        hist = fit(model, arrays(), **{**OPTS, **job["options"]})
        out = Path(spec["dir"]) / job["name"]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"writes.{world.rank}.json").write_text(json.dumps(writes))
        if world.is_main:
            np.savez(out / "weights.npz", **model.weights)
            (out / "history.json").write_text(json.dumps(list(hist)))
    distributed.shutdown()
    distributed.exit_worker(0)


def torchrun(nproc, spec, tmp_path, timeout=240):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**spec, "dir": str(tmp_path)}))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                        f"--nproc-per-node={nproc}", "--max-restarts=0", __file__, str(path)],
                       env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-8000:]
    return r


def one_process(batchnorm=False, **options):
    from cnnlab.training import fit
    model = net(batchnorm)
    hist = fit(model, arrays(), **{**OPTS, **options})
    return model.weights, list(hist)


def close_histories(a, b, rtol):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol), key
        for key in ("accuracy", "val_accuracy", "lr"):
            assert ra[key] == rb[key], key


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch for the comparisons: no BatchNorm (with a run directory),
    SyncBatchNorm, plain BatchNorm."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    jobs = [{"name": "plain", "batchnorm": False, "options": {"out": str(tmp / "run")}},
            {"name": "syncbn", "batchnorm": True, "options": {"sync_bn": True}},
            {"name": "bn", "batchnorm": True, "options": {}}]
    torchrun(2, {"jobs": jobs}, tmp)
    return tmp


def load_job(tmp, name):
    w = dict(np.load(tmp / name / "weights.npz"))
    return w, json.loads((tmp / name / "history.json").read_text())


def test_a_rank_takes_its_piece_of_the_global_batch_weighted_by_its_size():
    from cnnlab.engines.torch.backend import TorchBackend

    class Rank:
        sync_bn = []
        _shard = TorchBackend._shard

        def __init__(self, rank, size):
            self.rank, self.world_size = rank, size

    idx = np.arange(100, 115)           # a batch of 15 on 2 ranks: 8 + 7
    pieces = [Rank(r, 2)._shard(idx) for r in range(2)]
    assert [list(p) for p, _ in pieces] == [list(a) for a in np.array_split(idx, 2)]
    assert [w for _, w in pieces] == [8 * 2 / 15, 7 * 2 / 15]   # n_r N / B: mean of B
    three = [Rank(r, 3)._shard(idx[:2]) for r in range(3)]       # fewer images than ranks
    assert [(list(p), w) for p, w in three] == [([100], 1.5), ([101], 1.5), ([100], 0)]
    assert Rank(0, 1)._shard(idx) == (idx, 1)                      # one process: unchanged


def test_two_ranks_end_with_the_weights_of_one_process(two_ranks):
    """Uneven shards (15 = 8 + 7, the last batch 10 = 5 + 5): the weighted loss makes
    DDP's mean gradient one process's; the all-reduced metrics are one process's."""
    w2, h2 = load_job(two_ranks, "plain")
    w1, h1 = one_process()
    assert w2.keys() == w1.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert max(np.abs(w1[k] - net().weights[k]).max() for k in w1) > 0.05   # it trained
    close_histories(h2, h1, rtol=1e-5)


def test_sync_batchnorm_equals_one_process_and_plain_batchnorm_is_close(two_ranks):
    w1, h1 = one_process(batchnorm=True)
    ws, hs = load_job(two_ranks, "syncbn")
    for k in w1:   # moving statistics included
        np.testing.assert_allclose(ws[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    close_histories(hs, h1, rtol=1e-5)
    # per-rank statistics of 7 or 8 images: not equal, but close
    wp, hp = load_job(two_ranks, "bn")
    diff = np.sqrt(sum(((wp[k] - w1[k]) ** 2).sum() for k in w1))
    assert 1e-4 < diff < 0.3 * np.sqrt(sum((w1[k] ** 2).sum() for k in w1))
    assert [r["loss"] for r in hp] == pytest.approx([r["loss"] for r in h1], rel=0.05)


def test_only_rank_0_writes_the_run_directory_once_per_file(two_ranks):
    tmp = two_ranks
    assert json.loads((tmp / "plain" / "writes.1.json").read_text()) == []
    assert json.loads((tmp / "plain" / "writes.0.json").read_text()) == [
        "config.json", "checkpoint.safetensors", "history.csv",      # epoch 1
        "checkpoint.safetensors", "history.csv",                     # epoch 2
        "history.csv"]                                               # finish
    from cnnlab.fileformat import unpack
    tensors, meta = unpack(tmp / "run" / "checkpoint.safetensors")
    assert meta["backend"]["ranks"] == 2 and "rng.torch.r1" in tensors
    assert not (tmp / "plain" / "writes.2.json").exists()


# the command line: --nproc, Ctrl-C, a killed rank, resume -------------------------------
def cnnlab(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder data set (train/ and test/) and a JSON model without BatchNorm."""
    from PIL import Image
    root = tmp_path_factory.mktemp("folder")
    ds = arrays(96, 24)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        for i, (img, label) in enumerate(zip(x, y)):
            (root / "data" / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[:, :, 0]).save(root / "data" / split / str(label) / f"{i}.png")
    (root / "model.json").write_text(json.dumps({"input_shape": [8, 8, 1], "layers": [
        {"type": "Conv2D", "config": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
        {"type": "Flatten"}, {"type": "Dense", "config": {"units": 3,
                                                          "activation": "softmax"}}]}))
    return root


def train_args(folder, out, epochs=40):
    return ["train", folder / "model.json", "--data", folder / "data", "--epochs", epochs,
            "--batch-size", 8, "--optimizer", "sgd", "--lr", 0.05, "--out", out, "--quiet"]


@pytest.fixture(scope="module")
def reference(folder):
    """An uninterrupted 2-rank run through the command line."""
    out = folder / "reference"
    code, stdout, err = finish(cnnlab(*train_args(folder, out), "--nproc", 2))
    assert code == 0, err
    assert "2 ranks (gloo)" in stdout and stdout.count("Epoch 40/40") == 1
    assert "Traceback" not in err
    return out


def weights(run_dir):
    from cnnlab.fileformat import unpack
    return unpack(run_dir / "model.safetensors")[0]


def children(pid):
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                           text=True).stdout.split()]


def start_and_wait_for_a_checkpoint(folder, out):
    proc = cnnlab(*train_args(folder, out), "--nproc", 2)
    deadline = time.time() + 120
    while not (out / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    workers = children(proc.pid)
    assert len(workers) == 2
    return proc, workers


def assert_gone(pids):
    deadline = time.time() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids), "orphan worker"


def test_a_killed_rank_stops_the_other_and_the_run_resumes_exactly(folder, reference):
    out = folder / "killed"
    proc, workers = start_and_wait_for_a_checkpoint(folder, out)
    os.kill(workers[-1], signal.SIGKILL)
    code, _, err = finish(proc, timeout=60)
    assert code == 1, err
    assert "was killed by SIGKILL; all ranks stopped" in err
    assert f"resume with: cnnlab train --resume {out} --nproc 2" in err
    assert "Traceback" not in err
    assert_gone(workers)
    from cnnlab.fileformat import unpack
    _, meta = unpack(out / "checkpoint.safetensors")    # intact: the last finished epoch
    assert 1 <= meta["trainer"]["epoch"] < 40 and meta["trainer"]["step_in_epoch"] == 0
    code, stdout, err = finish(cnnlab("train", "--resume", out, "--nproc", 2))
    assert code == 0, err
    assert "Resuming" in stdout and "Note:" not in stdout
    ref = weights(reference)
    assert all(np.array_equal(v, ref[k]) for k, v in weights(out).items())   # bit-exact


def test_ctrl_c_stops_every_rank_after_a_step_and_another_nproc_resumes(folder, reference):
    out = folder / "interrupted"
    proc, workers = start_and_wait_for_a_checkpoint(folder, out)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)          # what Ctrl-C sends the launcher
    code, _, err = finish(proc, timeout=60)
    assert code == 130, err
    assert f"checkpoint saved to {out}/checkpoint.safetensors" in err
    assert f"resume with: cnnlab train --resume {out} --nproc 2" in err
    assert err.count("stopping after this step") == 1 and "Traceback" not in err
    assert_gone(workers)
    # one process continues the 2-rank run: the same math, another summation order
    code, stdout, err = finish(cnnlab("train", "--resume", out))
    assert code == 0, err
    assert "trained so far on 2 ranks, now 1" in stdout
    ref = weights(reference)
    for k, v in weights(out).items():
        np.testing.assert_allclose(v, ref[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_nproc_1_is_the_one_process_path(folder, capsys):
    import torch.distributed as dist
    from cnnlab.cli import main
    a, b = folder / "one_a", folder / "one_b"
    assert main([str(x) for x in train_args(folder, a, epochs=2)] + ["--nproc", "1"]) == 0
    assert main([str(x) for x in train_args(folder, b, epochs=2)]) == 0
    assert not dist.is_initialized()
    assert "ranks" not in capsys.readouterr().out
    wa, wb = weights(a), weights(b)
    assert all(np.array_equal(v, wb[k]) for k, v in wa.items())
    assert "ranks" not in json.dumps(json.loads((a / "config.json").read_text()))


def test_bad_nproc_and_numpy_engine_are_one_line_errors(folder):
    code, _, err = finish(cnnlab(*train_args(folder, folder / "x"), "--nproc", 0))
    assert code == 1 and err.strip() == "error: --nproc must be >= 1, got 0"
    code, _, err = finish(cnnlab(*train_args(folder, folder / "x"), "--nproc", 2,
                                 "--engine", "numpy"))
    assert code == 1 and err.strip() == "error: --nproc needs the torch engine"
    code, _, err = finish(cnnlab(*train_args(folder, folder / "y"), "--nproc", 2, "--lr", -1))
    assert code == 1 and err.strip() == "error: lr must be > 0, got -1.0"   # rank 0 alone
    assert not (folder / "y").exists()


if __name__ == "__main__":
    worker(sys.argv[1])

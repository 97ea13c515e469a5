"""Downloads against a real HTTP server on 127.0.0.1: success, bad checksum, cut connection, server down."""
import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from cnnlab.datasets import DatasetError, load
from cnnlab.datasets import download as download_mod
from cnnlab.datasets import registry
from cnnlab.datasets.download import DownloadError, download_file
from cnnlab.datasets.idx import write_idx

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def mnist_files(seed=0):
    """{file name: gz bytes} of a tiny MNIST in the canonical format, and the train images."""
    rng = np.random.default_rng(seed)
    out, x_train = {}, None
    for split, n in (("train", 6), ("t10k", 3)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        out[f"{split}-images-idx3-ubyte.gz"] = gzip.compress(write_idx(x), mtime=0)
        out[f"{split}-labels-idx1-ubyte.gz"] = gzip.compress(write_idx(y), mtime=0)
        x_train = x if split == "train" else x_train
    return out, x_train


class Server:
    """Serves routes {url path: bytes}; paths in `cut` announce 1000 bytes more than they send."""

    def __init__(self):
        self.routes, self.cut, self.requests = {}, set(), []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                body = owner.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                cut = self.path in owner.cut
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if cut else 0)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if cut else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    s = Server()
    monkeypatch.setenv("CNNLAB_MIRROR", s.url)
    yield s
    s.stop()


@pytest.fixture
def served_mnist(server, monkeypatch):
    """The tiny MNIST on the server, with its md5s standing in for the official ones."""
    files, x_train = mnist_files()
    for name, data in files.items():
        server.routes[f"/mnist/{name}"] = data
        monkeypatch.setitem(registry.DATASETS["mnist"].download, name, hashlib.md5(data).hexdigest())
    return files, x_train


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def test_download_success_with_progress_on_stderr(tmp_path, served_mnist, server, capsys):
    files, x_train = served_mnist
    ds = load("mnist", tmp_path / "data")
    folder = tmp_path / "data" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert all((folder / f).read_bytes() == files[f] for f in FILES)
    assert np.array_equal(ds.x_train[..., 0], x_train)
    assert sorted(server.requests) == sorted(f"/mnist/{f}" for f in FILES)
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err  # the tqdm bar
    load("mnist", tmp_path / "data", progress=False)
    assert len(server.requests) == 4  # nothing fetched twice


def test_only_missing_files_are_fetched(tmp_path, served_mnist, server):
    files, _ = served_mnist
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for f in FILES[:3]:
        (folder / f).write_bytes(files[f])
    load("mnist", tmp_path / "data", progress=False)
    assert server.requests == [f"/mnist/{FILES[3]}"]


def test_checksum_mismatch_leaves_nothing_behind(tmp_path, served_mnist, server):
    server.routes[f"/mnist/{FILES[0]}"] = b"tampered" + served_mnist[0][FILES[0]]
    with pytest.raises(DatasetError, match=f"{FILES[0]}: checksum mismatch"):
        load("mnist", tmp_path / "data", progress=False)
    folder = tmp_path / "data" / "mnist"
    assert not (folder / FILES[0]).exists() and leftovers(folder) == []


def test_connection_cut_mid_file_keeps_the_previous_state(tmp_path, served_mnist, server):
    files, _ = served_mnist
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / FILES[0]).write_bytes(files[FILES[0]])
    os.utime(folder / FILES[0], ns=(10**18, 10**18))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    server.cut.add(f"/mnist/{FILES[1]}")
    with pytest.raises(DatasetError, match=f"{FILES[1]}: connection closed after"):
        load("mnist", tmp_path / "data", progress=False)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before and leftovers(folder) == []


def test_server_down_gives_one_clear_message(tmp_path, server):
    server.stop()
    with pytest.raises(DatasetError) as err:
        load("cifar10", tmp_path / "data", progress=False)
    msg = str(err.value)
    assert msg.startswith("Could not download cifar10") and "cannot connect" in msg
    assert f"{server.url}/cifar10/cifar-10-python.tar.gz" in msg  # the URL
    assert str(tmp_path / "data" / "cifar10") in msg  # where to put it by hand
    assert "Traceback" not in msg and not (tmp_path / "data" / "cifar10").exists()


def test_http_404_names_the_file(tmp_path, server):
    with pytest.raises(DatasetError, match="fashion-mnist: train-images-idx3-ubyte.gz: HTTP 404"):
        load("fashion-mnist", tmp_path / "data", progress=False)


def test_download_goes_to_the_first_writable_dir(tmp_path, served_mnist, server, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    try:
        ds = load("mnist", ro, progress=False)
    finally:
        os.chmod(ro, 0o755)
    assert ds.source == str(tmp_path / "env" / "mnist") and not list(ro.iterdir())


def test_cnnlab_data_env_and_download_false(tmp_path, served_mnist, server, monkeypatch):
    files, x_train = served_mnist
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetError, match="mnist not found.*env/mnist"):
        load("mnist", download=False)
    assert server.requests == []
    (tmp_path / "env" / "mnist").mkdir(parents=True)
    for f in FILES:
        (tmp_path / "env" / "mnist" / f).write_bytes(files[f])
    ds = load("mnist", download=False, progress=False)
    assert np.array_equal(ds.x_train[..., 0], x_train) and server.requests == []


def test_emnist_zip_is_downloaded_and_read(tmp_path, server, monkeypatch):
    import io
    import zipfile
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("gzip/emnist-digits-mapping.txt", "".join(f"{i} {48 + i}\n" for i in range(10)))
        for part in ("train", "test"):
            zf.writestr(f"gzip/emnist-digits-{part}-images-idx3-ubyte.gz",
                        gzip.compress(write_idx(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))))
            zf.writestr(f"gzip/emnist-digits-{part}-labels-idx1-ubyte.gz",
                        gzip.compress(write_idx(np.arange(4, dtype=np.uint8))))
    server.routes["/emnist/gzip.zip"] = buf.getvalue()
    monkeypatch.setitem(registry.DATASETS["emnist-digits"].download, "gzip.zip",
                        hashlib.md5(buf.getvalue()).hexdigest())
    ds = load("emnist-digits", tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "emnist" / "gzip.zip").is_file() and ds.y_train.tolist() == [0, 1, 2, 3]


def test_ctrl_c_during_download_leaves_no_partial_file(tmp_path, server, monkeypatch):
    server.routes["/big"] = b"x" * 3_000_000

    class Interrupting:
        def update(self, n):
            raise KeyboardInterrupt

        def close(self):
            pass
    monkeypatch.setattr(download_mod, "progress_bar", lambda *a, **k: Interrupting())
    with pytest.raises(KeyboardInterrupt):
        download_file(f"{server.url}/big", tmp_path / "dl" / "big.bin")
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_file_replaces_atomically_and_checks_md5(tmp_path, server):
    server.routes["/f"] = b"new content"
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_file(f"{server.url}/f", dest, md5="0" * 32, progress=False)
    assert dest.read_bytes() == b"old"
    download_file(f"{server.url}/f", dest, md5=hashlib.md5(b"new content").hexdigest(), progress=False)
    assert dest.read_bytes() == b"new content" and sorted(os.listdir(tmp_path)) == ["f.bin"]

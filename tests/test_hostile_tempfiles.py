"""Interrupted writers: a Ctrl-C at any moment leaves no temporary file, files left by a
kill -9 (writes and downloads) are removed by the next write into the folder, other
files are never touched, and Ctrl-C while the command line starts exits 130 quietly."""
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cnnlab import atomic
from cnnlab.atomic import atomic_writer, clean_stale_temp_files

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def our_temp(folder, pid, host=None, name="m.safetensors.tmp"):
    host = host or atomic._host_tag()
    p = folder / f".cnnlab-tmp-{host}-{pid}-abcd1234-{name}"
    p.write_bytes(b"partial")
    return p


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_ctrl_c_while_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "m.bin").write_bytes(b"old")
    real_open = os.open

    def open_then_interrupt(path, flags, mode=0o777, **kw):
        fd = real_open(path, flags, mode, **kw)  # created, then the second Ctrl-C arrives
        os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(tmp_path / "m.bin") as f:
            f.write(b"new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    assert (tmp_path / "m.bin").read_bytes() == b"old"


def test_ctrl_c_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(tmp_path / "m.bin") as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys, time
from cnnlab.atomic import atomic_writer
with atomic_writer(sys.argv[1]) as f:
    f.write(b"x" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "run" / "model.safetensors"
    seen = set()
    for _ in range(3):  # each writer removes what the previous killed one left
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=ENV,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "writing"
        p.kill()
        p.wait()
        p.stdout.close()
        leftovers = [q.name for q in target.parent.iterdir()]
        assert len(leftovers) == 1 and leftovers[0].startswith(".cnnlab-tmp-")
        assert leftovers[0].endswith("-model.safetensors.tmp") and leftovers[0] not in seen
        seen.add(leftovers[0])
    # files that are not ours, or ours and still being written, stay
    foreign = [target.parent / ".model.safetensors.x1y2.tmp", target.parent / "notes.txt",
               target.parent / ".cnnlab-tmp-notours"]
    for f in foreign:
        f.write_bytes(b"keep")
    live = our_temp(target.parent, os.getppid())
    other_host = our_temp(target.parent, dead_pid(), host="00000000")
    from cnnlab import Dense, Flatten, Input, Sequential
    Sequential([Input((2, 2, 1)), Flatten(), Dense(2)]).save(target)
    assert sorted(q.name for q in target.parent.iterdir()) == sorted(
        [target.name, live.name, other_host.name] + [f.name for f in foreign])


def test_stale_rules(tmp_path):
    dead = our_temp(tmp_path, dead_pid(), name="a.tmp")
    mine = our_temp(tmp_path, os.getpid(), name="b.tmp")
    far = our_temp(tmp_path, 1, host="00000000", name="c.tmp")
    old_far = our_temp(tmp_path, 1, host="00000000", name="d.tmp")
    hour = atomic.STALE_AFTER
    os.utime(old_far, (time.time() - hour - 60,) * 2)
    removed = clean_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, old_far.name])
    assert mine.exists() and far.exists()
    # much later, even a file of a live process (a reused pid) is stale
    assert clean_stale_temp_files(tmp_path, now=time.time() + hour + 60) != []
    assert list(tmp_path.iterdir()) == []


class SlowServer:
    """Serves one file; the first request sends two thirds and then stalls."""

    def __init__(self, body):
        self.stall = True
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.stall:
                    self.wfile.write(body[:2 * len(body) // 3])
                    self.wfile.flush()
                    time.sleep(20)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/f.bin"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


DOWNLOADER = """
import sys
from cnnlab.datasets.download import download_file
download_file(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_killed_download_leaves_a_part_file_that_the_next_download_removes(tmp_path):
    body = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    server = SlowServer(body)
    try:
        dest = tmp_path / "data" / "f.bin"
        p = subprocess.Popen([sys.executable, "-c", DOWNLOADER, server.url, str(dest)], env=ENV)
        for _ in range(1200):  # until the first megabyte is on disk
            parts = list(dest.parent.glob(".cnnlab-tmp-*.part")) if dest.parent.exists() else []
            if parts and parts[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        p.kill()
        p.wait()
        assert len(parts) == 1 and not dest.exists()
        server.stall = False
        from cnnlab.datasets.download import download_file
        download_file(server.url, dest, progress=False)
        assert dest.read_bytes() == body
        assert [q.name for q in dest.parent.iterdir()] == ["f.bin"]
    finally:
        server.stop()


# --- Ctrl-C while the command line starts -------------------------------------------------
def test_ctrl_c_while_building_the_parser_exits_130_quietly(monkeypatch, capsys):
    from cnnlab import cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["zoo"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err


STARTUP = """
import os, signal, sys, builtins
import cnnlab.cli as cli
real_import = builtins.__import__
def slow_import(name, *args, **kw):  # a real SIGINT while the command's imports run
    if name == "training" or name.endswith(".training"):
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kw)
builtins.__import__ = slow_import
sys.exit(cli.main(["zoo"]))
"""


def test_a_real_sigint_during_start_up_imports(tmp_path):
    r = subprocess.run([sys.executable, "-c", STARTUP], env=ENV, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    assert r.stdout == ""


def test_cache_folders_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    from cnnlab.datasets import cache
    root = tmp_path / "cache"
    root.mkdir()
    left = root / f".cnnlab-tmp-{atomic._host_tag()}-{dead_pid()}-k2j3x9ab-mnist-0123"
    left.mkdir()
    (left / "x_train.npy").write_bytes(b"\0" * 100)
    keep = root / ".mnist-0123.abcdefgh"  # not ours by name: stays
    keep.mkdir()
    entry = cache.save([root], "mnist", "4567", {"a": np.arange(3)}, {"source": "s"})
    assert entry == root / "mnist-4567"
    assert sorted(p.name for p in root.iterdir()) == sorted([keep.name, "mnist-4567"])
    arrays, _ = cache.load([root], "mnist", "4567")
    assert arrays["a"].tolist() == [0, 1, 2]

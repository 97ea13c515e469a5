"""`cnnlab serve` against slow, unfinished, malformed and heavy requests: a real server
process on 127.0.0.1 with a short request timeout, spoken to over raw sockets."""
from __future__ import annotations

import http.client
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("waitress")

from serving import cli_env, data_url, drawing_png, free_port, save_model, serve  # noqa: E402

TIMEOUT = 2  # the server's --timeout in this module (seconds)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("server") / "lenet.safetensors")


@pytest.fixture(scope="module")
def server(model_path):
    with serve(model_path, "--timeout", str(TIMEOUT)) as s:
        yield s
    assert s.proc.returncode == 0 and "Traceback" not in s.stderr, s.stderr


def connect(server, timeout=TIMEOUT * 8):
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_answer(sock):
    """(status, headers, JSON body) of one answer, then whether the server closed."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    body = r.read()
    assert r.getheader("Content-Type") == "application/json", body[:200]
    assert body.count(b"\n") == 0
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:  # closed while the client was still sending
        closed = True
    return r.status, dict(r.getheaders()), json.loads(body), closed


def predict_ok(server):
    status, body = server.post_json("/api/predict", {"image": data_url(drawing_png())})
    return status == 200 and not body["empty"]


# protocol errors are JSON ---------------------------------------------------------------------
@pytest.mark.parametrize("raw,code,words", [
    (b"GARBAGE\r\n\r\n", 400, "malformed"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400, "malformed"),
    (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "malformed"),
    (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "not implemented"),
    (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413,
     "at most 10 MiB"),
    (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"FFFFFFFFFFFF\r\n", 413, "too large"),  # a 17 TB chunk announced
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URL is too long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 40_000 + b"\r\n\r\n", 431, "headers"),
], ids=["garbage", "bad-header", "negative-length", "gzip", "content-length-99MB",
        "17TB-chunk", "long-url", "long-header"])
def test_protocol_errors_are_one_line_json(server, raw, code, words):
    with connect(server) as s:
        s.sendall(raw)
        status, headers, body, closed = read_answer(s)
    assert status == code and set(body) == {"error"} and words in body["error"]
    assert "Server" not in headers and closed
    assert predict_ok(server)


def test_no_version_banner_and_no_host_echo(server):
    for path in ("/", "/static", "/static/", "/api/nothing", "/healthz", "//evil.example/"):
        with connect(server) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: evil.example\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        assert head.startswith("http/1.1 200") or head.startswith("http/1.1 404"), head
        assert "server:" not in head and "location:" not in head and "evil" not in head
        assert b"waitress" not in data.lower() and b"evil.example" not in data


# slow and unfinished requests ------------------------------------------------------------------
UNFINISHED = {
    "body shorter than Content-Length":
        b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100\r\n\r\nabc",
    "headers never finished": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n",
    "request line never finished": b"GET /heal",
    "chunked body never finished":
        b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
    "json body never finished":
        b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n{\"image\": \"data:image/png;base64,",
}


def test_unfinished_requests_get_408_and_are_closed(server):
    socks = {}
    for name, raw in UNFINISHED.items():
        s = connect(server)
        s.sendall(raw)
        socks[name] = s
    assert predict_ok(server)  # meanwhile others are served
    for name, s in socks.items():
        with s:
            status, _, body, closed = read_answer(s)  # blocks until the deadline
        assert status == 408 and closed, name
        assert body == {"error": "the request did not arrive in time"}


def test_slowloris_is_closed_while_others_are_served(server):
    """150 connections trickle a header byte every 0.2 s: each is answered 408 and closed
    after the request deadline, and normal requests go through all along."""
    n = 150
    socks = []
    for _ in range(n):
        s = connect(server)
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Trickle: ")
        socks.append(s)
    served, answers, stop = [], {}, threading.Event()

    def others():
        while not stop.is_set() and len(served) < 200:
            served.append(predict_ok(server))

    t = threading.Thread(target=others)
    t.start()
    open_ = list(socks)
    for _ in range(int(TIMEOUT * 8 / 0.2)):  # bounded: up to 8 deadlines
        if not open_:
            break
        ready, _, _ = select.select(open_, [], [], 0.2)
        for s in ready:
            answers[s] = read_answer(s)
            open_.remove(s)
        for s in open_:
            try:
                s.send(b"a")
            except OSError:
                pass
    stop.set()
    t.join(60)
    for s in socks:
        s.close()
    assert not open_, f"{len(open_)} slow connections still open"
    assert all(a[0] == 408 and a[3] for a in answers.values())
    assert served and all(served), f"{served.count(False)} of {len(served)} failed"
    assert predict_ok(server)


def test_idle_keep_alive_connections_are_closed(server):
    with connect(server) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        r = http.client.HTTPResponse(s)
        r.begin()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        assert s.recv(1) == b""  # waits for the idle timeout (within TIMEOUT * 8)


# memory -------------------------------------------------------------------------------------------
def peak_rss_mib(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def big_png(side) -> bytes:
    img = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    ImageDraw.Draw(img).line([(side // 4, side // 5), (side * 3 // 4, side // 5),
                              (side // 2, side * 4 // 5)], fill=(0, 0, 0, 255),
                             width=side // 14)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_parallel_large_images_stay_under_the_memory_bound(model_path):
    """8 clients at once post a 3464x3464 PNG (43 KB; over the pixel limit), 8 post the
    largest PNG allowed (2896x2896 RGBA, 32 MiB decoded) and 4 post 9 MiB of junk: the
    server's peak RSS stays under 500 MiB (8 parallel decodes of the 3464x3464 PNG took
    it from 337 MiB to 1.8 GiB before decodes were gated)."""
    over, largest = big_png(3464), big_png(2896)
    junk = os.urandom(9 * 1024 * 1024)  # 9 MiB bodies: read at most two at a time
    with serve(model_path, "--timeout", "30") as srv:
        base = peak_rss_mib(srv.proc.pid)
        results, junk_results = [], []

        def post(data):
            results.append(srv.post_file("/api/activations", data))

        def post_junk():
            junk_results.append(srv.json("POST", "/api/predict", junk,
                                         {"Content-Type": "image/png"}))

        threads = [threading.Thread(target=post, args=(d,)) for d in [over, largest] * 8]
        threads += [threading.Thread(target=post_junk) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = peak_rss_mib(srv.proc.pid)
    print(f"\nserver peak RSS: {base:.0f} MiB at start, {peak:.0f} MiB after 16 large images "
          "and 4 bodies of 9 MiB")
    assert [s for s, _ in junk_results] == [400] * 4
    codes = sorted(s for s, _ in results)
    assert codes == [200] * 8 + [413] * 8, codes
    assert all(b["top"][0]["label"] for s, b in results if s == 200)
    assert all("too large (3464x3464" in b["error"] for s, b in results if s == 413)
    assert peak < 500


# where it listens ---------------------------------------------------------------------------------
def test_loopback_addresses_are_local():
    from cnnlab.serve.cli import is_local, urls
    for a in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.9"):
        assert is_local(a), a
    for a in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "fe80::1", "128.0.0.1", "nonsense"):
        assert not is_local(a), a
    shown = urls("0.0.0.0", "0.0.0.0", 8000)
    assert shown[0] == ("http://127.0.0.1:8000/", "this machine")
    assert all("0.0.0.0" not in u for u, _ in shown)
    assert all(n == "other machines" for _, n in shown[1:])
    six = urls("::", "::", 8000)
    assert [u for u, _ in six[:2]] == ["http://127.0.0.1:8000/", "http://[::1]:8000/"]
    assert all("[::]" not in u for u, _ in six)
    assert urls("localhost", "127.0.0.1", 80) == [("http://localhost:80/", "this machine")]


def test_other_loopback_address_gives_no_warning(model_path):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not configured on this system")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "serve", str(model_path),
                             "--host", "127.0.0.2", "--port", str(port)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.2", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.2:{port}/" in out and "stopped" in out
    assert "reachable" not in out + err and "Traceback" not in err, out + err


def test_bad_server_options_are_one_line_errors(model_path, capsys):
    from cnnlab.cli import main
    for opt in (["--threads", "0"], ["--timeout", "0"], ["--max-connections", "-1"]):
        assert main(["serve", str(model_path), "--port", str(free_port()), *opt]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {opt[0]} ") and err.count("\n") == 1

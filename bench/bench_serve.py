"""Serving: latency, throughput, slow clients and memory of `cnnlab serve` on loopback.

Starts `python -m cnnlab.cli serve MODEL` as a user does (waitress, default threads and
limits, --timeout as given), then:

1. load: POSTs a canvas drawing (a 280x280 transparent PNG as a JSON data URL, what the
   page sends) to /api/predict from 1, 8 and 32 concurrent clients, each on its own
   keep-alive connection, for --seconds each: p50/p99 latency, requests/s, errors.
2. attack: 8 clients keep posting drawings for --seconds while 150 slowloris
   connections trickle a header byte every 0.5 s and 26 requests stay unfinished (a
   body shorter than its Content-Length, a 17 TB chunk announced, headers never
   finished, a chunked body cut short): when the server closed each one, and what the
   8 clients saw meanwhile.
3. memory: 8 clients at once post a 3464x3464 PNG of ~43 KB and 8 the largest PNG
   allowed; the server's peak RSS (VmHWM) over the whole run is reported.

The clients run on the same machine as the server, so they take some of its CPU.
Updates its section of bench/RESULTS.md.

    python bench/bench_serve.py                        # 60 s per level, lenet trained on mnist-5k
    python bench/bench_serve.py --seconds 10 --model runs/demo
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from results import write_section  # noqa: E402

TITLE = "Serving (bench/bench_serve.py)"
SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def drawing_payload() -> bytes:
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(70, 60), (210, 60), (120, 230)], fill=(17, 17, 17, 255),
                             width=20, joint="curve")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return json.dumps({"image": "data:image/png;base64," +
                       base64.b64encode(buf.getvalue()).decode()}).encode()


def big_png(side) -> bytes:
    img = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    ImageDraw.Draw(img).line([(side // 4, side // 5), (side * 3 // 4, side // 5),
                              (side // 2, side * 4 // 5)], fill=(0, 0, 0, 255),
                             width=side // 14)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def train_lenet(folder: Path) -> Path:
    from cnnlab import zoo
    from cnnlab import Sequential
    m = Sequential(zoo.lenet(), name="lenet")
    m.fit("mnist-5k", epochs=3, batch_size=64, lr=0.003, verbose=0)
    return m.save(folder / "lenet.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in SIMD if f in have) or "none of " + " ".join(SIMD)
    except OSError:
        pass
    return "unknown"


def peak_rss_mib(pid) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(model, engine, port, timeout, threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "serve", str(model),
                             "--port", str(port), "--engine", engine,
                             "--timeout", f"{timeout:g}", "--threads", str(threads)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 60 s")


def run_level(port, clients, seconds, payload):
    """`clients` threads posting for `seconds`; returns (latencies ms, server ms, errors,
    wall seconds)."""
    lat, server_ms, errors = [], [], [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}
    reference = {}

    def client():
        conn, mine, srv, errs = None, [], [], 0
        while time.perf_counter() < stop:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                t = time.perf_counter()
                conn.request("POST", "/api/predict", body=payload, headers=headers)
                r = conn.getresponse()
                body = r.read()
                dt = (time.perf_counter() - t) * 1000
                data = json.loads(body)
                if r.status != 200 or data.get("probabilities") != reference.setdefault(
                        "p", data.get("probabilities")):
                    errs += 1
                    continue
                mine.append(dt)
                srv.append(data["ms"])
            except (OSError, http.client.HTTPException, ValueError):
                errs += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            lat.extend(mine)
            server_ms.extend(srv)
            errors[0] += errs

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(lat), np.array(server_ms), errors[0], time.perf_counter() - t0


def summary(clients, lat, srv, errors, wall) -> dict:
    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else float("nan")
    return {"clients": clients, "requests": len(lat), "rps": len(lat) / wall,
            "p50": pct(lat, 50), "p99": pct(lat, 99), "server_p50": pct(srv, 50),
            "errors": errors}


UNFINISHED = [
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    b"Content-Length: 100000\r\n\r\n\x89PNG",
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n",
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
]


def attack(port, seconds, payload, timeout):
    """150 slowloris + 26 unfinished requests during a `seconds` run of 8 clients."""
    def connect():
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setblocking(False)
        return s
    socks = {}
    for i in range(150):
        s = connect()
        s.send(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Trickle: ")
        socks[s] = ("slowloris", time.perf_counter())
    for i in range(26):
        s = connect()
        s.send(UNFINISHED[i % len(UNFINISHED)])
        socks[s] = ("unfinished", time.perf_counter())
    closed, result = {}, {}

    def others():
        result["level"] = summary(8, *run_level(port, 8, seconds, payload))

    t = threading.Thread(target=others)
    t.start()
    end = time.perf_counter() + max(seconds, timeout * 4)
    while socks and time.perf_counter() < end:
        ready, _, _ = select.select(list(socks), [], [], 0.5)
        for s in ready:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data or b"\r\n\r\n" in data:  # an answer (408 or 413) or a close
                kind, since = socks.pop(s)
                closed.setdefault(kind, []).append(
                    (time.perf_counter() - since, data.split(b" ", 2)[1:2]))
                s.close()
        for s, (kind, _) in socks.items():
            if kind == "slowloris":
                try:
                    s.send(b"a")
                except OSError:
                    pass
    t.join()
    for s in socks:
        s.close()
    out = {"level": result["level"], "still_open": len(socks)}
    for kind in ("slowloris", "unfinished"):
        times = [dt for dt, _ in closed.get(kind, [])]
        codes = sorted({c[0].decode() for _, c in closed.get(kind, []) if c})
        out[kind] = {"closed": len(times), "max_s": max(times) if times else float("nan"),
                     "codes": codes}
    return out


def memory(port):
    over, largest = big_png(3464), big_png(2896)
    codes = []

    def post(data):
        boundary = "bench" + os.urandom(6).hex()
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
            f"\r\n--{boundary}--\r\n".encode()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/api/activations", body=body,
                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        r = c.getresponse()
        r.read()
        codes.append(r.status)
        c.close()

    threads = [threading.Thread(target=post, args=(d,)) for d in [over, largest] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"over_bytes": len(over), "largest_bytes": len(largest), "codes": sorted(codes)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model file or run directory (default: lenet trained "
                                    "on mnist-5k for 3 epochs, in a temporary folder)")
    ap.add_argument("--engine", default="numpy", choices=["numpy", "torch"])
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each level")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--timeout", type=float, default=5.0,
                    help="the server's --timeout (request deadline and idle limit)")
    ap.add_argument("--threads", type=int, default=4, help="the server's --threads")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    payload = drawing_payload()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else train_lenet(Path(tmp))
        port = free_port()
        proc = start_server(model, args.engine, port, args.timeout, args.threads)
        try:
            start_rss = peak_rss_mib(proc.pid)
            load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            run_level(port, 1, min(2.0, args.seconds), payload)  # warm-up
            rows = []
            for c in levels:
                row = summary(c, *run_level(port, c, args.seconds, payload))
                rows.append(row)
                print(f"{c:>3} clients: {row['requests']:>6} requests, {row['rps']:7.1f} req/s, "
                      f"p50 {row['p50']:6.2f} ms, p99 {row['p99']:7.2f} ms "
                      f"(in the server: p50 {row['server_p50']:.2f} ms), {row['errors']} errors",
                      flush=True)
            load_rss = peak_rss_mib(proc.pid)
            hit = attack(port, args.seconds, payload, args.timeout)
            lv = hit["level"]
            print(f"attack: 150 slowloris closed {hit['slowloris']['closed']} "
                  f"(last after {hit['slowloris']['max_s']:.1f} s, "
                  f"{hit['slowloris']['codes']}), 26 unfinished closed "
                  f"{hit['unfinished']['closed']} (last after {hit['unfinished']['max_s']:.1f} s, "
                  f"{hit['unfinished']['codes']}), still open {hit['still_open']}; meanwhile "
                  f"8 clients: p50 {lv['p50']:.2f} ms, p99 {lv['p99']:.2f} ms, "
                  f"{lv['errors']} errors", flush=True)
            mem = memory(port)
            alive = run_level(port, 1, 1.0, payload)[2] == 0
            peak = peak_rss_mib(proc.pid)
            load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(f"memory: 16 large PNGs answered {mem['codes']}; peak RSS {start_rss:.0f} MiB "
                  f"at start, {load_rss:.0f} MiB after the load levels, {peak:.0f} MiB at the "
                  f"end; server alive after: {alive}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    one = next((r for r in rows if r["clients"] == 1), rows[0])
    most = rows[-1]
    sl, un = hit["slowloris"], hit["unfinished"]
    slack = 2.5  # the deadline is checked once a second, in a loop that wakes once a second
    closed_in_time = (hit["still_open"] == 0 and sl["max_s"] <= args.timeout + slack
                      and un["max_s"] <= args.timeout + slack)
    goals = [
        ("p50 <= 10 ms for one client", one["p50"] <= 10, f"{one['p50']:.2f} ms"),
        (f"0 errors at {most['clients']} clients", most["errors"] == 0, str(most["errors"])),
        (f"p99 <= 250 ms at {most['clients']} clients", most["p99"] <= 250,
         f"{most['p99']:.1f} ms"),
        (f"slowloris and unfinished requests closed within the timeout ({args.timeout:g} s "
         f"+ {slack:g} s)", closed_in_time, f"last after {max(sl['max_s'], un['max_s']):.1f} s"),
        ("other clients served meanwhile", lv["errors"] == 0 and lv["requests"] > 0,
         f"{lv['requests']} requests, {lv['errors']} errors, p99 {lv['p99']:.1f} ms"),
        ("peak RSS < 500 MiB", peak < 500, f"{peak:.0f} MiB"),
    ]
    verdict = "Goals: " + "; ".join(f"{name} ({'met' if ok else 'missed'}: {value})"
                                   for name, ok, value in goals) + "."
    print(verdict)
    if not args.no_write:
        table = ["| clients | requests | req/s | p50 ms | p99 ms | p50 in server ms | errors |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        table += [f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['server_p50']:.2f} | {r['errors']} |"
                  for r in rows + [dict(lv, clients="8, under attack")]]
        name = Path(args.model).name if args.model else "lenet (mnist-5k, 3 epochs)"
        body = (f"CPU flags: {cpu_flags()}. The machine was shared with other work while "
                f"measured (1-minute load average {load_before:.1f} at the start, "
                f"{load_after:.1f} at the end, this benchmark included): the figures are "
                "noisy.\n\n"
                f"`POST /api/predict` with a 280x280 canvas drawing (JSON data URL, "
                f"{len(payload):,} bytes), model {name}, {args.engine} engine, waitress "
                f"({args.threads} threads, --timeout {args.timeout:g}) on 127.0.0.1; clients "
                f"in the same machine, one keep-alive connection each; "
                f"**{args.seconds:g} s per level**.\n\n"
                + "\n".join(table) +
                f"\n\nUnder attack (last row): 150 slowloris connections (a header byte every "
                f"0.5 s) and 26 unfinished requests; closed: {sl['closed']} slowloris (answers "
                f"{', '.join(sl['codes']) or 'none'}, the last after {sl['max_s']:.1f} s), "
                f"{un['closed']} unfinished (answers {', '.join(un['codes']) or 'none'}, the "
                f"last after {un['max_s']:.1f} s), {hit['still_open']} still open.\n\n"
                f"Memory: 8 clients at once post a 3464x3464 PNG ({mem['over_bytes']:,} bytes; "
                f"over the pixel limit) and 8 a 2896x2896 RGBA PNG ({mem['largest_bytes']:,} "
                f"bytes; the largest allowed): answers {mem['codes'].count(200)} x 200, "
                f"{mem['codes'].count(413)} x 413. Server peak RSS (VmHWM): "
                f"{start_rss:.0f} MiB at start, {load_rss:.0f} MiB after the load levels, "
                f"**{peak:.0f} MiB** at the end.\n\n{verdict}\n\n"
                f"Reproduce: `.venv/bin/python bench/bench_serve.py --seconds {args.seconds:g}`\n")
        write_section(TITLE, body)
        print(f"updated {ROOT / 'bench' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

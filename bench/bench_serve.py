"""Serving speed: latency and throughput of `cnnlab serve` on loopback.

Starts `python -m cnnlab.cli serve MODEL` as a user does, then POSTs a canvas
drawing (a 280x280 transparent PNG as a JSON data URL, what the page sends) to
/api/predict from 1, 8 and 32 concurrent clients, each on its own keep-alive
connection, for --seconds each. Reports p50/p99 latency, requests/s and errors,
and updates its section of bench/RESULTS.md. The clients run on the same machine
as the server, so they take some of its CPU.

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


def drawing_payload() -> bytes:
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(70, 60), (210, 60), (120, 230)], fill=(17, 17, 17, 255),
                             width=20, joint="curve")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return json.dumps({"image": "data:image/png;base64," +
                       base64.b64encode(buf.getvalue()).decode()}).encode()


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


def start_server(model, engine, port):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "serve", str(model),
                             "--port", str(port), "--engine", engine], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    """`clients` threads posting for `seconds`; returns (latencies ms, server ms, errors)."""
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model file or run directory (default: lenet trained "
                                    "on mnist-5k for 3 epochs, in a temporary folder)")
    ap.add_argument("--engine", default="numpy", choices=["numpy", "torch"])
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each level")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    payload = drawing_payload()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else train_lenet(Path(tmp))
        port = free_port()
        proc = start_server(model, args.engine, port)
        try:
            run_level(port, 1, min(2.0, args.seconds), payload)  # warm-up
            rows = []
            for c in levels:
                lat, srv, errors, wall = run_level(port, c, args.seconds, payload)
                row = {"clients": c, "requests": len(lat), "rps": len(lat) / wall,
                       "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                       "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                       "server_p50": float(np.percentile(srv, 50)) if len(srv) else float("nan"),
                       "errors": errors}
                rows.append(row)
                print(f"{c:>3} clients: {row['requests']:>6} requests, {row['rps']:7.1f} req/s, "
                      f"p50 {row['p50']:6.2f} ms, p99 {row['p99']:7.2f} ms "
                      f"(in the server: p50 {row['server_p50']:.2f} ms), {errors} errors",
                      flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    one = next((r for r in rows if r["clients"] == 1), rows[0])
    most = rows[-1]
    verdict = (f"Goal: p50 <= 10 ms for one drawing ({'met' if one['p50'] <= 10 else 'missed'}: "
               f"{one['p50']:.2f} ms); zero errors at {most['clients']} clients "
               f"({'met' if most['errors'] == 0 else 'missed'}: {most['errors']}).")
    print(verdict)
    if not args.no_write:
        table = ["| clients | requests | req/s | p50 ms | p99 ms | p50 in server ms | errors |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        table += [f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['server_p50']:.2f} | {r['errors']} |" for r in rows]
        name = Path(args.model).name if args.model else "lenet (mnist-5k, 3 epochs)"
        body = (f"`POST /api/predict` with a 280x280 canvas drawing (JSON data URL, "
                f"{len(payload):,} bytes), model {name}, "
                f"{args.engine} engine, threaded server on 127.0.0.1; clients in the same machine, "
                f"one keep-alive connection each; **{args.seconds:g} s per level**.\n\n"
                + "\n".join(table) + f"\n\n{verdict}\n")
        write_section(TITLE, body)
        print(f"updated {ROOT / 'bench' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzzing /api/predict with malformed input: never a 5xx, and the server stays up."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest

pytest.importorskip("waitress")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from serving import data_url, save_model, serve  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(save_model(tmp_path_factory.mktemp("fuzz") / "lenet.safetensors")) as s:
        yield s
    assert s.proc.returncode == 0 and "Traceback" not in s.stderr, s.stderr


def encoded(fmt, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    a = rng.integers(0, 255, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    img = Image.fromarray(a, "RGBA" if mode == "RGBA" else "RGB")
    if mode == "L":
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


SAMPLES = [encoded("PNG"), encoded("PNG", mode="RGBA"), encoded("JPEG"), encoded("GIF"),
           encoded("BMP", mode="L"), encoded("WEBP"), encoded("TIFF")]


def with_dimensions(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR saying width x height (CRC fixed)."""
    data = bytearray(png)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def send(server, how, data: bytes):
    if how == "multipart":
        return server.post_file("/api/predict", data)
    if how == "json":
        return server.post_json("/api/predict", {"image": data_url(data)})
    return server.json("POST", "/api/predict", data, {"Content-Type": "image/png"})


def check(status, body):
    assert status < 500, body
    if status == 200:
        assert set(body) >= {"empty", "top", "probabilities", "input", "ms"}
    else:
        assert 400 <= status < 500 and set(body) == {"error"} and "\n" not in body["error"]


HOW = st.sampled_from(["multipart", "json", "raw"])


@FUZZ
@given(how=HOW, data=st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda s, cut: s[:cut], st.sampled_from(SAMPLES), st.integers(0, 4000)),
    st.builds(lambda s, pos, val: s[:pos % len(s)] + bytes([val]) + s[pos % len(s) + 1:],
              st.sampled_from(SAMPLES), st.integers(0, 10 ** 6), st.integers(0, 255)),
    st.builds(lambda s, junk: s + junk, st.sampled_from(SAMPLES), st.binary(max_size=200)),
))
def test_random_and_damaged_files(server, how, data):
    check(*send(server, how, data))


@FUZZ
@given(how=HOW, width=st.integers(0, 2 ** 31 - 1), height=st.integers(0, 2 ** 31 - 1))
def test_claimed_dimensions(server, how, width, height):
    status, body = send(server, how, with_dimensions(SAMPLES[0], width, height))
    check(status, body)
    if width * height > 8_388_608:
        assert status == 413


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=50),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)


@FUZZ
@given(body=st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["image", "mode", "x"]), JSON, max_size=3)
    .map(lambda d: json.dumps(d).encode()),
    st.builds(lambda img, mode: json.dumps({"image": img, "mode": mode}).encode(),
              st.text(max_size=100) | st.just(data_url(SAMPLES[0])),
              st.none() | st.text(max_size=12) | st.sampled_from(["auto", "drawing", "resize"])),
    st.binary(max_size=300),
), ctype=st.sampled_from(["application/json", "application/json; charset=utf-8",
                          "text/plain", "application/x-www-form-urlencoded",
                          "multipart/form-data", "image/png", ""]))
def test_weird_bodies_and_content_types(server, body, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    check(*server.json("POST", "/api/predict", body, headers))


def test_still_up_after_fuzzing(server):
    status, body = server.json("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    check(*send(server, "multipart", SAMPLES[0]))

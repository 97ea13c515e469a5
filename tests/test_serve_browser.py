"""The page of `cnnlab serve` in Debian's Chromium, driven by Playwright.

Draws with the mouse, uploads a digit, and checks that the page shows what the API
answers for the same image. Screenshots go to a temporary folder, with copies at
/tmp/cnnlab-serve-screenshot.png and /tmp/cnnlab-serve-screenshot-phone.png.
CNNLAB_TEST_SERVE_MODEL picks the model (default: an untrained lenet).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("waitress")
sync_api = pytest.importorskip("playwright.sync_api")

from serving import save_model, serve  # noqa: E402

SHOTS = {"desktop": Path("/tmp/cnnlab-serve-screenshot.png"),
         "phone": Path("/tmp/cnnlab-serve-screenshot-phone.png"),
         "bad-upload": Path("/tmp/cnnlab-serve-screenshot-bad-upload.png"),
         "server-down": Path("/tmp/cnnlab-serve-screenshot-server-down.png")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = os.environ.get("CNNLAB_TEST_SERVE_MODEL") or \
        save_model(tmp_path_factory.mktemp("browser") / "lenet.safetensors")
    with serve(path) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def open_page(browser, server, **context):
    ctx = browser.new_context(**context)
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_selector("body[data-state=idle]")
    page.wait_for_function("document.querySelectorAll('.bar-row').length > 0")
    return page


def settle(page):
    page.wait_for_timeout(150)  # longer than the debounce
    page.wait_for_selector("body[data-state=idle]", timeout=15000)


def stroke(page, points):
    box = page.locator("#pad").bounding_box()
    sx, sy = box["width"] / 280, box["height"] / 280
    xy = [(box["x"] + x * sx, box["y"] + y * sy) for x, y in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=2)
    page.mouse.up()


def vertical_line():
    return [(140, 40 + 10 * i) for i in range(21)]


def circle():
    return [(140 + 80 * math.cos(t / 24 * 2 * math.pi), 140 + 90 * math.sin(t / 24 * 2 * math.pi))
            for t in range(25)]


def api_top(server, page):
    """The API's answer for the canvas exactly as the page has it."""
    url = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
    status, body = server.post_json("/api/predict", {"image": url})
    assert status == 200 and not body["empty"]
    return body


def shown(page):
    return page.inner_text("#top-label").strip(), page.inner_text("#top-prob").strip()


def check_matches_api(page, body):
    label, prob = shown(page)
    assert label == body["top"][0]["label"]
    p = body["top"][0]["probability"]
    assert prob == ("100%" if p >= 0.9995 else f"{100 * p:.1f}%")


def test_draw_upload_and_layers(browser, server, shots, tmp_path):
    page = open_page(browser, server, viewport={"width": 1280, "height": 900})
    n_classes = page.locator(".bar-row").count()
    assert n_classes == len(server.json("GET", "/api/model")[1]["class_names"])
    assert page.inner_text("#top-label").strip() == "–"
    assert page.locator("#facts dd").count() >= 3
    assert page.locator("#summary tbody tr").count() >= 3

    # a vertical line
    stroke(page, vertical_line())
    settle(page)
    check_matches_api(page, api_top(server, page))
    assert page.locator(".bar-row.best").count() == 1
    width = page.eval_on_selector(".bar-row.best .bar-fill", "e => e.getBoundingClientRect().width")
    assert width > 0
    assert page.locator("#input-img").is_visible()
    assert page.eval_on_selector("#input-img", "e => e.naturalWidth") == 28

    # feature maps of every conv and pooling layer, dense bars
    layers = server.json("GET", "/api/model")[1]["summary"]["layers"]
    n_maps = sum(l["output_shape"][-1] for l in layers
                 if l["type"] in ("Conv2D", "MaxPool2D", "AvgPool2D"))
    page.wait_for_function(f"document.querySelectorAll('.map').length === {n_maps}")
    sprites = page.evaluate("""() => Promise.all([...document.querySelectorAll('.layer-maps')].map(
        sec => new Promise(done => {
            const url = getComputedStyle(sec.querySelector('.map')).backgroundImage
                .slice(5, -2);
            const img = new Image();
            img.onload = () => done([url.slice(0, 22), img.naturalWidth]);
            img.onerror = () => done([url.slice(0, 22), 0]);
            img.src = url;
        })))""")
    assert len(sprites) == 4
    assert all(prefix == "data:image/png;base64," and width > 0 for prefix, width in sprites)
    assert page.locator(".layer-vector .vcol").count() >= n_classes
    page.locator(".map").nth(2).click()
    assert page.locator("#zoom").is_visible()
    assert "map 3 of" in page.inner_text("#zoom-caption")
    assert "data:image/png" in page.eval_on_selector(
        "#zoom-map", "e => getComputedStyle(e).backgroundImage")
    page.keyboard.press("Escape")
    assert not page.locator("#zoom").is_visible()

    # a circle on a clean canvas; undo and clear
    page.click("#clear")
    settle(page)
    assert page.inner_text("#top-label").strip() == "–"
    stroke(page, circle())
    settle(page)
    check_matches_api(page, api_top(server, page))
    page.screenshot(path=str(shots / "desktop.png"), full_page=True)
    shutil.copy(shots / "desktop.png", SHOTS["desktop"])
    stroke(page, vertical_line())
    settle(page)
    check_matches_api(page, api_top(server, page))
    page.click("#undo")
    settle(page)
    check_matches_api(page, api_top(server, page))

    # uploading a digit
    from cnnlab import datasets
    digit = datasets.load("mnist-5k", progress=False).x_test[0, ..., 0]
    path = tmp_path / "digit.png"
    Image.fromarray(digit).save(path)
    page.set_input_files("#upload", str(path))
    settle(page)
    status, body = server.post_file("/api/predict", path.read_bytes())
    assert status == 200
    check_matches_api(page, body)
    assert page.get_attribute("#input-img", "src") == body["input"]
    assert page.evaluate("document.querySelectorAll('.bar-row').length") == n_classes

    # a non-image upload shows the server's message, clears the old prediction, and the
    # page keeps working
    assert page.errors == []
    assert page.locator(".map").count() == n_maps
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#upload", str(bad))
    settle(page)
    assert page.inner_text("#status").strip() == \
        "this file is not an image we can read: PNG, JPEG, GIF, BMP, WebP"
    assert_cleared(page, "no prediction")
    page.screenshot(path=str(shots / "bad-upload.png"), full_page=True)
    shutil.copy(shots / "bad-upload.png", SHOTS["bad-upload"])
    page.click("#clear")
    settle(page)
    assert page.inner_text("#status").strip() == ""
    stroke(page, vertical_line())
    settle(page)
    check_matches_api(page, api_top(server, page))
    assert [e for e in page.errors if "status of 400" not in e] == []


def assert_cleared(page, panel):
    """No prediction on show: the panel's text, no best class, empty bars, no maps."""
    assert page.inner_text("#top-label").strip() == "–"
    assert page.inner_text("#top-prob").strip() == panel
    assert page.locator(".bar-row.best").count() == 0
    widths = page.eval_on_selector_all(".bar-fill", "es => es.map(e => e.style.width)")
    assert widths and set(widths) == {"0px"}  # set at once; drawn after the CSS transition
    assert all(t == "" for t in page.eval_on_selector_all(".bar-value", "es => es.map(e => e.textContent)"))
    assert not page.locator("#input-img").is_visible()
    assert page.locator(".map").count() == 0 and page.locator(".layer").count() == 0
    assert page.inner_text("#timing").strip() == ""


def test_server_down_says_so(browser, tmp_path):
    """The server stops after the page loaded: drawing says it cannot be reached (not
    'draw something'), and the last prediction is cleared."""
    model = save_model(tmp_path / "lenet.safetensors")
    with serve(model) as s:
        page = open_page(browser, s, viewport={"width": 1280, "height": 900})
        stroke(page, circle())
        settle(page)
        assert page.locator(".map").count() > 0
    stroke(page, vertical_line())
    settle(page)
    assert "server cannot be reached" in page.inner_text("#status")
    assert_cleared(page, "cannot reach the server")
    page.screenshot(path=str(SHOTS["server-down"]), full_page=True)
    assert [e for e in page.errors if "ERR_CONNECTION_REFUSED" not in e] == []


def test_phone_width(browser, server, shots):
    page = open_page(browser, server, viewport={"width": 390, "height": 844},
                     device_scale_factor=2, is_mobile=True, has_touch=True)
    stroke(page, [(90, 60), (200, 60), (120, 230)])
    settle(page)
    check_matches_api(page, api_top(server, page))
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    canvas_w = page.locator("#pad").bounding_box()["width"]
    assert 250 <= canvas_w <= 390
    page.screenshot(path=str(shots / "phone.png"), full_page=True)
    shutil.copy(shots / "phone.png", SHOTS["phone"])
    assert page.errors == []


def test_page_works_offline(browser, server):
    """Every request the page makes goes to the server itself (no CDN)."""
    ctx = browser.new_context()
    page = ctx.new_page()
    hosts = []
    page.on("request", lambda r: hosts.append(r.url.split("/")[2]))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_selector("body[data-state=idle]")
    assert hosts and set(hosts) == {f"127.0.0.1:{server.port}"}
    ctx.close()


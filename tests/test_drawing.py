"""The drawing preprocessing of `cnnlab serve` (cnnlab.inputs.drawing)."""
from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnnlab import datasets, zoo
from cnnlab import Sequential
from cnnlab.inputs import drawing
from cnnlab.inputs.drawing import ImageInputError

SIZE = 280


# helpers -------------------------------------------------------------------------------
def canvas(strokes, width=20, ink=(17, 17, 17, 255), bg=(0, 0, 0, 0), mode="RGBA"):
    """A canvas-like image: polylines of `ink` on `bg` (transparent by default)."""
    img = Image.new(mode, (SIZE, SIZE), bg if mode != "L" else bg[0])
    d = ImageDraw.Draw(img)
    for pts in strokes:
        d.line(pts, fill=ink if mode != "L" else ink[0], width=width, joint="curve")
        for x, y in (pts[0], pts[-1]):
            r = width / 2
            d.ellipse((x - r, y - r, x + r, y + r), fill=ink if mode != "L" else ink[0])
    return img


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def seven():
    return [[(70, 60), (210, 60), (120, 230)]]


def circle(cx=140, cy=140, r=80, n=48):
    return [[(cx + r * np.cos(t), cy + r * np.sin(t)) for t in np.linspace(0, 2 * np.pi, n)]]


def bbox(a, thr=0):
    rows = np.flatnonzero((a > thr).any(axis=1))
    cols = np.flatnonzero((a > thr).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def com(a):
    ys, xs = np.indices(a.shape)
    a = a.astype(np.float64)
    return (ys * a).sum() / a.sum(), (xs * a).sum() / a.sum()


def near(a, b, tol=4):
    """Equal up to small grey-level noise and a one-pixel shift (centring ties)."""
    a = a.astype(int)
    return min(np.abs(np.roll(a, (dy, dx), (0, 1)) - b).mean()
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)) < tol


def model_for(shape=(28, 28, 1), dataset="mnist", classes=10):
    layers = zoo.lenet(shape, classes) if shape[-1] == 1 else zoo.cifar_basic(shape, classes)
    m = Sequential(layers)
    m.meta = {"class_names": [str(i) for i in range(classes)], "training": {"dataset": dataset}}
    return m


def grey(img):
    return drawing.to_grey(img)


# the MNIST steps ---------------------------------------------------------------------------
def test_transparent_canvas_becomes_light_ink_on_black_20px_centred():
    out = drawing.mnist_like(grey(canvas(seven())))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255 and out[0].max() == 0 and out[:, 0].max() == 0  # dark background
    h, w = bbox(out, 0)
    assert max(h, w) in (20, 21)  # longer side 20 px (+1 for the antialiased edge)
    cy, cx = com(out)
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6


@pytest.mark.parametrize("variant", ["white", "grey-L", "light-on-black", "rgb-jpeg",
                                     "light-on-transparent"])
def test_backgrounds_and_polarities_agree(variant):
    ref = drawing.mnist_like(grey(canvas(circle())))
    if variant == "white":
        img = canvas(circle(), bg=(255, 255, 255, 255))
    elif variant == "grey-L":
        img = canvas(circle(), ink=(30,) * 4, bg=(230,) * 4, mode="L")
    elif variant == "light-on-black":
        img = canvas(circle(), ink=(255, 255, 255, 255), bg=(0, 0, 0, 255))
    elif variant == "light-on-transparent":
        img = canvas(circle(), ink=(250, 250, 250, 255))
    else:
        buf = io.BytesIO()
        canvas(circle(), ink=(20, 30, 200, 255), bg=(250, 250, 240, 255)).convert("RGB") \
            .save(buf, format="JPEG", quality=85)
        img = Image.open(io.BytesIO(buf.getvalue()))
    out = drawing.mnist_like(grey(img))
    assert near(out, ref)


def test_aspect_ratio_is_kept():
    out = drawing.mnist_like(grey(canvas([[(40, 140), (240, 140)]], width=16)))
    h, w = bbox(out, 40)
    assert w == 20 and h <= 3


def test_thin_vertical_line_is_a_one():
    out = drawing.mnist_like(grey(canvas([[(140, 30), (140, 250)]], width=18)))
    h, w = bbox(out, 40)
    assert h == 20 and w <= 3
    assert abs(com(out)[1] - 14) <= 0.6


@pytest.mark.parametrize("img", [
    Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0)),
    Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 255)),
    Image.new("L", (50, 30), 128),
    Image.new("RGB", (1, 1), (3, 4, 5)),
    Image.fromarray(np.random.default_rng(0).integers(120, 130, (64, 64)).astype(np.uint8)),
], ids=["transparent", "white", "grey", "one-pixel", "faint-noise"])
def test_nothing_drawn_is_empty(img):
    assert drawing.mnist_like(grey(img)) is None
    assert drawing.prepare(model_for(), png(img)) == (None, "drawing")


def test_mnist_digits_pass_through_almost_unchanged():
    ds = datasets.load("mnist-5k", progress=False)
    x = ds.x_test[:300, ..., 0]
    out = np.stack([drawing.mnist_like(im.astype(np.float32)) for im in x])
    assert np.abs(out.astype(int) - x).mean() < 1.5
    inverted = np.stack([drawing.mnist_like(255.0 - im) for im in x[:50]])
    assert np.abs(inverted.astype(int) - out[:50]).mean() < 0.5


def test_prepare_uploaded_mnist_png_matches_mnist_like():
    im = datasets.load("mnist-5k", progress=False).x_test[7, ..., 0]
    x, mode = drawing.prepare(model_for(), png(Image.fromarray(im)))
    assert mode == "drawing" and x.shape == (28, 28, 1)
    np.testing.assert_array_equal(x[..., 0], drawing.mnist_like(im.astype(np.float32)))


# choosing the path ---------------------------------------------------------------------------
def test_mode_for_models():
    assert drawing.mode_for(model_for()) == "drawing"
    assert drawing.mode_for(model_for(dataset="emnist-letters", classes=26)) == "drawing"
    assert drawing.mode_for(model_for(dataset="fashion-mnist")) == "resize"
    assert drawing.mode_for(model_for((32, 32, 3), "cifar10")) == "resize"


def test_emnist_layout_fills_24px_and_centres_the_box():
    m = model_for(dataset="emnist-letters", classes=26)
    x, mode = drawing.prepare(m, png(canvas(seven())))
    assert mode == "drawing"
    h, w = bbox(x[..., 0], 0)
    assert max(h, w) in (24, 25)


def test_resize_path_for_rgb_models():
    m = model_for((32, 32, 3), "cifar10")
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3)).astype(np.uint8))
    x, mode = drawing.prepare(m, png(photo))
    assert mode == "resize" and x.shape == (32, 32, 3) and x.dtype == np.uint8
    expected = datasets.load_image(io.BytesIO(png(photo)), (32, 32, 3))
    np.testing.assert_array_equal(x, expected)
    g, _ = drawing.prepare(m, png(photo.convert("L")))
    assert g.shape == (32, 32, 3) and (g[..., 0] == g[..., 2]).all()
    # dark strokes on a transparent canvas land on white, not on black
    c, _ = drawing.prepare(m, png(canvas(seven())))
    assert np.median(c) > 200
    assert drawing.prepare(m, png(Image.new("RGBA", (99, 99))))[0] is None


def test_forced_modes():
    m = model_for()
    x, mode = drawing.prepare(m, png(canvas(seven())), mode="resize")
    assert mode == "resize" and x.shape == (28, 28, 1)
    with pytest.raises(ImageInputError, match="unknown mode"):
        drawing.prepare(m, png(canvas(seven())), mode="sideways")


# decoding guards ---------------------------------------------------------------------------
def bomb_png(width=40_000, height=40_000) -> bytes:
    """A small PNG whose header claims width x height pixels."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_huge_dimensions_are_refused_before_decoding():
    with pytest.raises(ImageInputError, match="too large"):
        drawing.open_image(bomb_png())
    with pytest.raises(ImageInputError, match="too large"):
        drawing.open_image(png(Image.new("L", (300, 300))), max_pixels=10_000)
    side = int(drawing.MAX_PIXELS ** 0.5) + 1  # just over the limit for a PNG
    with pytest.raises(ImageInputError, match=r"too large \(2897x2897; at most 8\.4 megap"):
        drawing.open_image(bomb_png(side, side))


class Gate:
    """A stand-in for the decode semaphore that counts its uses."""
    def __init__(self):
        self.entered = 0

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *exc):
        return False


def jpeg(img, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_large_images_are_shrunk_on_decode_inside_the_gate():
    # a 24 MP JPEG is over the PNG limit but decodes at 1/4 scale (draft), then halves
    big = Image.new("L", (6000, 4000), 230)
    ImageDraw.Draw(big).line([(3000, 800), (3000, 3200)], fill=20, width=300)
    gate = Gate()
    img = drawing.open_image(jpeg(big), gate=gate)
    assert gate.entered == 1 and img.size == (750, 500)
    ref = drawing.mnist_like(grey(canvas([[(140, 40), (140, 240)]], width=35,
                                          bg=(230, 230, 230, 255))))
    assert near(drawing.mnist_like(grey(img)), ref, tol=12)
    # a 2.9 MP PNG is decoded whole, then box-reduced by 3
    img = drawing.open_image(png(Image.new("RGB", (2400, 1200), (9, 9, 9))), gate=gate)
    assert gate.entered == 2 and img.size == (800, 400) and img.getpixel((5, 5)) == (9, 9, 9)
    # a small image does not wait for the gate and keeps its size
    img = drawing.open_image(png(canvas(seven())), gate=gate)
    assert gate.entered == 2 and img.size == (SIZE, SIZE)
    # palettes and 16-bit grey are shrunk too
    p = Image.new("RGB", (2100, 30), (200, 10, 10)).convert("P")
    pal = drawing.open_image(png(p))
    assert pal.size == (700, 10)
    # box averages of the dithered palette colours come back near the original colour
    assert np.abs(np.subtract(pal.convert("RGB").getpixel((1, 1)), (200, 10, 10))).max() <= 4
    deep = Image.fromarray(np.full((30, 2100), 65535, np.uint16))
    assert drawing.to_grey(drawing.open_image(png(deep))).min() == 255


def test_a_file_that_is_no_image_says_which_formats_work():
    with pytest.raises(ImageInputError) as e:
        drawing.open_image(b"just some text\n")
    assert str(e.value) == "this file is not an image we can read: PNG, JPEG, GIF, BMP, WebP"


@pytest.mark.parametrize("data", [b"", b"hello world", png(Image.new("L", (64, 64), 9))[:60],
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a" + b"\xff" * 20],
                         ids=["empty", "text", "truncated-png", "bad-png", "bad-gif"])
def test_broken_images_raise_one_line_errors(data):
    with pytest.raises(ImageInputError) as e:
        drawing.open_image(data)
    assert "\n" not in str(e.value)


def test_other_modes_decode():
    sixteen = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    assert drawing.to_grey(drawing.open_image(png(sixteen))).max() <= 255
    pal = canvas(seven(), bg=(255, 255, 255, 255)).convert("P")
    assert drawing.mnist_like(grey(drawing.open_image(png(pal)))) is not None
    la = canvas(seven()).convert("LA")
    assert drawing.mnist_like(grey(drawing.open_image(png(la)))) is not None


def test_data_urls():
    raw = png(canvas(seven()))
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert drawing.decode_data_url(url) == raw
    assert drawing.decode_data_url(base64.b64encode(raw).decode()) == raw
    for bad in ["", "data:image/png;base64,@@@", "data:text/plain,hello", 42, None]:
        with pytest.raises(ImageInputError):
            drawing.decode_data_url(bad)


def test_png_data_url_roundtrip():
    a = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    url = drawing.png_data_url(a)
    back = np.asarray(Image.open(io.BytesIO(drawing.decode_data_url(url))))
    np.testing.assert_array_equal(back, a[..., 0])


# photos in uneven light -------------------------------------------------------------------------
def photo(digit, rng, shadow=True, size=320):
    """A JPEG photo of an MNIST digit written in dark ink on light paper; with `shadow`,
    a smooth shadow (45-65% less light) over a corner, its edge across the page."""
    side = int(rng.integers(120, 180))
    d = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC),
                   np.float32) / 255
    a = np.zeros((size, size), np.float32)
    oy, ox = rng.integers(40, size - side - 40, 2)
    a[oy:oy + side, ox:ox + side] = np.clip(d, 0, 1)
    paper, ink = rng.uniform(0.78, 0.92), rng.uniform(0.12, 0.25)
    ys, xs = np.mgrid[0:size, 0:size] / size
    corner = rng.integers(0, 4)
    u, v = (xs if corner % 2 else 1 - xs), (ys if corner // 2 else 1 - ys)
    edge, depth, soft = rng.uniform(0.6, 0.9), rng.uniform(0.45, 0.65), rng.uniform(0.05, 0.12)
    light = 1 - depth / (1 + np.exp(-((u + v) - edge) / soft)) if shadow else 1.0
    img = 255 * (paper - (paper - ink) * a) * light * rng.uniform(0.9, 1.05) \
        + rng.normal(0, 3, a.shape)
    return jpeg(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), quality=85)


def photos(digits, shadow, seed=1):
    rng = np.random.default_rng(seed)
    return [photo(d, rng, shadow) for d in digits]


def test_a_shadow_is_not_taken_for_ink():
    digits = datasets.load("mnist-5k", progress=False).x_test[:12, ..., 0]
    m = model_for()
    for even, shaded in zip(photos(digits, False), photos(digits, True)):
        a, _ = drawing.prepare(m, even)
        b, _ = drawing.prepare(m, shaded)
        assert b is not None
        ink_a, ink_b = a[..., 0] > 64, b[..., 0] > 64
        assert (ink_a & ink_b).sum() / (ink_a | ink_b).sum() > 0.6  # the same strokes
        assert b[0].max() < 64 and b[-1].max() < 64  # no shadow edge in the picture
    # blank paper in the same light: nothing drawn
    blank = photos([np.zeros((28, 28), np.uint8)] * 3, True)
    assert [drawing.prepare(m, p)[0] for p in blank] == [None] * 3


def test_light_ink_on_a_dark_board_in_uneven_light():
    digit = datasets.load("mnist-5k", progress=False).x_test[3, ..., 0]
    dark = 255 - np.asarray(Image.open(io.BytesIO(photos([digit], True, seed=5)[0])))
    x, _ = drawing.prepare(model_for(), png(Image.fromarray(dark)))
    y, _ = drawing.prepare(model_for(), photos([digit], True, seed=5)[0])
    assert np.abs(x.astype(int) - y).mean() < 3


# accuracy on MNIST ---------------------------------------------------------------------------
def _data_dir():
    from conftest import SHARED_DATASETS
    found = (SHARED_DATASETS / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    return str(SHARED_DATASETS) if found else None


@pytest.fixture(scope="module")
def trained_model(request, tmp_path_factory):
    """CNNLAB_TEST_MNIST_MODEL, else lenet trained briefly on mnist-5k."""
    from cnnlab import load
    given = os.environ.get("CNNLAB_TEST_MNIST_MODEL")
    if given:
        return load(given)
    path = tmp_path_factory.mktemp("lenet") / "model.safetensors"
    if not path.exists():
        from cnnlab.engines import torch_available
        if not torch_available():
            pytest.skip("needs a trained model: set CNNLAB_TEST_MNIST_MODEL or install PyTorch")
        m = Sequential(zoo.lenet())
        m.fit("mnist-5k", epochs=3, batch_size=64, lr=0.003, verbose=0, seed=0)
        m.save(path)
    return load(path)


def test_drawn_preprocessing_keeps_mnist_accuracy(trained_model):
    """The full 10,000-image MNIST test set through the drawing path: the accuracy stays."""
    from cnnlab.engines import get_engine
    from cnnlab.preprocess import apply, preprocessing_of
    data_dir = _data_dir()
    if data_dir is None:
        pytest.skip("full MNIST is not in ../shared/datasets (set CNNLAB_SHARED_DATASETS "
                    "to a folder with mnist/)")
    ds = datasets.load("mnist", data_dir=data_dir, download=False, progress=False)
    x, y = ds.x_test, ds.y_test
    drawn = np.stack([drawing.mnist_like(im[..., 0].astype(np.float32)) for im in x])[..., None]
    eng, prep = get_engine(trained_model, "numpy"), preprocessing_of(trained_model)

    def accuracy(a):
        return float((eng.predict_proba(apply(prep, a)).argmax(1) == y).mean())

    raw, via = accuracy(x), accuracy(drawn)
    print(f"\nMNIST test set ({len(x)} images): raw {raw:.4f}, drawn-input preprocessing "
          f"{via:.4f}, difference {via - raw:+.4f}")
    assert via >= raw - 0.005


def test_shadowed_photos_read_like_evenly_lit_ones(trained_model):
    """Photos of 60 MNIST test digits in dark ink on paper, with a shadow over a corner:
    the shadow costs at most a few points of accuracy (it was 3 of 60 right before the
    paper's light was divided out)."""
    from cnnlab.engines import get_engine
    from cnnlab.preprocess import apply, preprocessing_of
    ds = datasets.load("mnist-5k", progress=False)
    x, y = ds.x_test[:60, ..., 0], ds.y_test[:60]
    eng, prep = get_engine(trained_model, "numpy"), preprocessing_of(trained_model)

    def accuracy(images):
        xs = [drawing.prepare(trained_model, p)[0] for p in images]
        xs = np.stack([a if a is not None else np.zeros((28, 28, 1), np.uint8) for a in xs])
        return float((eng.predict_proba(apply(prep, xs)).argmax(1) == y).mean())

    even, shaded = accuracy(photos(x, False)), accuracy(photos(x, True))
    print(f"\nphotos of 60 digits: evenly lit {even:.3f}, shadow over a corner {shaded:.3f}")
    assert shaded >= 0.8 and shaded >= even - 0.1

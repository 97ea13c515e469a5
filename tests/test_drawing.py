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

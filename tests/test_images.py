"""load_image: any size and mode converted the way the training data is."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cnnlab.datasets import DatasetError, load_image
from cnnlab.datasets import images as images_mod


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def ramp(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def test_grey_image_of_the_right_size_round_trips(tmp_path):
    a = ramp(28, 28, 1)
    p = save(Image.fromarray(a), tmp_path / "g.png")
    out = load_image(p, (28, 28, 1))
    assert out.dtype == np.uint8 and out.shape == (28, 28, 1)
    assert np.array_equal(out[..., 0], a)
    assert np.array_equal(load_image(p, (28, 28, 3)), np.repeat(a[..., None], 3, axis=2))


def test_colour_image_resized_then_grey_matches_pillow(tmp_path):
    a = ramp(30, 40, 3)
    p = save(Image.fromarray(a), tmp_path / "c.png")
    ref = Image.fromarray(a).resize((28, 28), Image.Resampling.BILINEAR)
    assert np.array_equal(load_image(p, (28, 28, 3)), np.asarray(ref))
    assert np.array_equal(load_image(p, (28, 28, 1))[..., 0], np.asarray(ref.convert("L")))


def test_luma_is_bit_exact_with_pillow():
    a = ramp(64, 64, 3, seed=1)
    assert np.array_equal(images_mod.luma(a)[..., 0], np.asarray(Image.fromarray(a).convert("L")))


def test_alpha_is_composited_onto_black(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[..., :3] = 255
    a[..., 3] = [[0, 255], [128, 255]]
    p = save(Image.fromarray(a, "RGBA"), tmp_path / "a.png")
    out = load_image(p, (2, 2, 1))[..., 0]
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[1, 1] == 255
    assert 126 <= out[1, 0] <= 130
    la = Image.fromarray(np.stack([np.full((2, 2), 200, np.uint8), a[..., 3]], -1), "LA")
    out = load_image(save(la, tmp_path / "la.png"), (2, 2, 3))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [200, 200, 200]


def test_palette_gif_bmp_1bit_and_16bit(tmp_path):
    rgb = ramp(8, 8, 3)
    gif = save(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
               tmp_path / "p.GIF")
    assert load_image(gif, (8, 8, 3)).shape == (8, 8, 3)
    bmp = save(Image.fromarray(rgb), tmp_path / "x.bmp")
    assert np.array_equal(load_image(bmp, (8, 8, 3)), rgb)
    bits = save(Image.fromarray(ramp(8, 8, 1) > 127), tmp_path / "b.png")
    assert set(np.unique(load_image(bits, (8, 8, 1)))) <= {0, 255}
    deep = Image.fromarray(np.array([[0, 257 * 100], [65535, 257]], dtype=np.uint16))
    out = load_image(save(deep, tmp_path / "d.png"), (2, 2, 1))[..., 0]
    assert out.tolist() == [[0, 100], [255, 1]]


def test_exif_orientation_is_applied(tmp_path):
    a = ramp(2, 4, 1)  # 2 rows, 4 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    p = save(Image.fromarray(a), tmp_path / "o.png", exif=exif)
    out = load_image(p, (4, 2, 1))[..., 0]
    assert np.array_equal(out, np.rot90(a, -1))


def test_file_objects_and_bytes(tmp_path):
    a = ramp(5, 7, 3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert np.array_equal(load_image(io.BytesIO(buf.getvalue()), (5, 7, 3)), a)
    assert np.array_equal(load_image(buf.getvalue(), (5, 7, 3)), a)


def png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_huge_and_broken_images_give_a_dataset_error_naming_the_file(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(60000, 60000))
    with pytest.raises(DatasetError, match="bomb.png.*too large"):
        load_image(bomb, (28, 28, 1))
    small = save(Image.fromarray(ramp(20, 20, 1)), tmp_path / "small.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    with pytest.raises(DatasetError, match="small.png.*too large"):
        load_image(small, (28, 28, 1))
    monkeypatch.undo()
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="junk.jpg"):
        load_image(junk, (28, 28, 1))
    cut = tmp_path / "cut.png"
    cut.write_bytes(small.read_bytes()[:60])
    with pytest.raises(DatasetError, match="cut.png"):
        load_image(cut, (28, 28, 1))
    with pytest.raises(DatasetError, match="nothing.png"):
        load_image(tmp_path / "nothing.png", (28, 28, 1))


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 2), (0, 5, 1), "28x28"])
def test_bad_shape_is_rejected(tmp_path, shape):
    with pytest.raises(DatasetError, match="shape"):
        load_image(tmp_path / "x.png", shape)

"""Batch augmentation: determinism, exact flips/shifts/crops, noise level, config checks;
the NumPy path equal to the PyTorch one."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cnnlab.augment import AUGMENT_KEYS, AugmentError, augment, check_augment  # noqa: E402


def gen(seed=0):
    return np.random.default_rng(seed)


def batch(n=16, c=3, h=12, w=10, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32))


def shifted(img, dy, dx):
    """img (C, H, W) moved down dy and right dx pixels, zeros coming in."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


FULL = {"translate": 0.1, "flip": True, "rotate": 15, "zoom": 0.1, "noise": 0.05, "crop": 2}


def test_same_seed_same_output_different_seed_differs():
    x = batch()
    a = augment(x, FULL, gen(7))
    b = augment(x, FULL, gen(7))
    c = augment(x, FULL, gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_flip_changes_exactly_the_chosen_images_and_is_its_own_inverse():
    x = batch(n=64)
    y = augment(x, {"flip": True}, gen(3))
    flipped = [bool(torch.equal(y[i], x[i].flip(-1))) for i in range(len(x))]
    kept = [bool(torch.equal(y[i], x[i])) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 16 < sum(flipped) < 48
    assert torch.equal(augment(y, {"flip": True}, gen(3)), x)


def test_integer_translate_with_zero_fill_is_an_exact_shift():
    x = batch(n=40, c=2, h=9, w=11)
    y = augment(x, {"translate": 2, "fill": "zero"}, gen(1))
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.allclose(y[i], shifted(x[i], dy, dx), atol=1e-5)]
        assert len(matches) == 1, f"image {i} is not a whole-pixel shift"
        seen.add(matches[0])
    assert len(seen) > 5  # shifts really vary per image


def test_crop_is_a_window_of_the_zero_padded_image():
    x = batch(n=30, c=1, h=8, w=8)
    y = augment(x, {"crop": 2, "fill": "zero"}, gen(2))
    for i in range(len(x)):
        assert any(torch.equal(y[i], shifted(x[i], dy, dx))
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_noise_has_the_requested_std():
    x = torch.zeros(64, 1, 32, 32)
    d = augment(x, {"noise": 0.2}, gen(0)) - x
    assert abs(d.mean().item()) < 0.005
    assert d.std().item() == pytest.approx(0.2, rel=0.02)


def test_rotate_and_zoom_keep_a_constant_image_constant_with_reflect_fill():
    x = torch.full((8, 3, 16, 16), 0.5)
    y = augment(x, {"rotate": 30, "zoom": 0.2, "translate": 0.2}, gen(0))
    assert torch.allclose(y, x, atol=1e-6)


def test_zero_rotation_and_no_shift_is_identity():
    x = batch()
    y = augment(x, {"rotate": 1e-9}, gen(0))
    assert torch.allclose(y, x, atol=1e-5)


def test_rotate_180_on_non_square_images_is_a_double_flip(monkeypatch):
    from cnnlab import augment as aug
    # every uniform draw at the top of its range, so the angle is +rotate
    monkeypatch.setattr(aug, "_uniform", lambda rng, n, scale: np.full(n, float(scale)))
    x = batch(n=4, h=6, w=10)
    y = augment(x, {"rotate": 180, "fill": "zero"}, gen(0))
    assert torch.allclose(y, x.flip(2).flip(3), atol=1e-5)
    sq = x[:, :, :6, :6]  # +90 degrees turns clockwise on screen (y points down)
    y = augment(sq, {"rotate": 90, "fill": "zero"}, gen(0))
    assert torch.allclose(y, torch.rot90(sq, -1, (2, 3)), atol=1e-5)


def test_shape_dtype_device_and_channels_last_preserved():
    x = batch(n=5, c=3, h=10, w=10).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xd = x.to(dtype)
        y = augment(xd, FULL, gen(0))
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert y.is_contiguous(memory_format=torch.channels_last)
    # channels_last input gives the same values as the contiguous one
    assert torch.allclose(augment(x, FULL, gen(4)), augment(x.contiguous(), FULL, gen(4)), atol=1e-6)


def test_empty_config_returns_input_and_empty_batch_ok():
    x = batch()
    assert augment(x, {}, gen(0)) is x
    assert augment(x[:0], FULL, gen(0)).shape == (0, 3, 12, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_with_a_cpu_generator():
    x = batch()
    y_cpu = augment(x, FULL, gen(5))
    y_gpu = augment(x.cuda().contiguous(memory_format=torch.channels_last), FULL, gen(5))
    assert y_gpu.is_cuda
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4)


def test_check_augment_normalizes_and_rejects():
    assert check_augment(None) == {}
    assert check_augment({"flip": False, "noise": 0}) == {}
    assert check_augment({"translate": 3.0}) == {"translate": 3, "fill": "reflect"}
    assert check_augment({"rotate": 10, "fill": "zero"}) == {"rotate": 10.0, "fill": "zero"}
    with pytest.raises(AugmentError, match="allowed: " + ", ".join(AUGMENT_KEYS)):
        check_augment({"flipp": True})
    for bad in ({"translate": -1}, {"translate": 1.5}, {"zoom": 1.0}, {"rotate": 200},
                {"fill": "wrap"}, {"flip": "yes"}, {"crop": 2.5}, {"noise": float("nan")},
                {"translate": True}):
        with pytest.raises(AugmentError):
            check_augment(bad)
    with pytest.raises(AugmentError):
        check_augment([("flip", True)])
    with pytest.raises(AugmentError, match="float tensor"):
        augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), {"flip": True}, gen(0))
    with pytest.raises(AugmentError, match="crop"):
        augment(torch.zeros(2, 1, 3, 3), {"crop": 3}, gen(0))


CONFIGS = [FULL, {"flip": True}, {"crop": 3}, {"crop": 2, "fill": "zero", "flip": True},
           {"translate": 2}, {"translate": 0.2, "fill": "zero"}, {"rotate": 30},
           {"zoom": 0.3, "fill": "zero"}, {"rotate": 180, "zoom": 0.5, "translate": 3},
           {"noise": 0.1}, {"translate": 0.15, "rotate": 45, "zoom": 0.25, "noise": 0.02}]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("seed", [0, 1, 123])
def test_numpy_equals_torch_for_the_same_seed(config, seed):
    """Same draws, same result: NumPy on NHWC arrays, PyTorch (affine_grid + grid_sample)
    on NCHW tensors, channels_last or not."""
    x = batch(n=12, c=3, h=11, w=9, seed=seed)
    want = augment(x, config, gen(seed))
    got = augment(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), config, gen(seed))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (12, 11, 9, 3)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)
    cl = augment(x.contiguous(memory_format=torch.channels_last), config, gen(seed))
    np.testing.assert_allclose(got, cl.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)


def test_numpy_path_float64_and_errors():
    x = np.random.default_rng(0).random((4, 6, 5, 2))
    y = augment(x, FULL, 3)  # an int seed is a Generator's seed
    assert y.dtype == np.float64 and y.shape == x.shape
    assert np.array_equal(y, augment(x, FULL, np.random.default_rng(3)))
    assert augment(x, {}, 0) is x
    f = augment(x, {"flip": True}, 5)
    flipped = [np.array_equal(f[i], x[i, :, ::-1]) for i in range(4)]
    assert all(flipped[i] or np.array_equal(f[i], x[i]) for i in range(4))
    assert any(flipped) and not all(flipped)
    with pytest.raises(AugmentError, match="float array"):
        augment(x.astype(np.uint8), FULL, 0)
    with pytest.raises(AugmentError, match="crop"):
        augment(x[:, :3, :3], {"crop": 3}, 0)
    with pytest.raises(AugmentError, match="NumPy Generator"):
        augment(x, FULL, torch.Generator())

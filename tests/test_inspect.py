"""cnnlab.inspect: figures, attribution, activation maximization and the HTML report,
checked by their numbers on hand-built models and a briefly trained lenet."""
import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from cnnlab import datasets, inspect as ci, zoo
from cnnlab.cli import main
from cnnlab.evaluate import evaluate
from cnnlab.layers import Conv2D, Dense, Flatten, GlobalAvgPool2D, Input
from cnnlab import Sequential

from cnnlab.engines import torch_available

ENGINES = ["torch"] if torch_available() else []
try:
    from cnnlab.engines.numpy.engine import NumpyEngine  # noqa: F401
    ENGINES.append("numpy")
except ImportError:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is faster than two competing for small ops."""
    try:
        import torch
    except ImportError:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def mnist():
    return datasets.load("mnist-5k")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    """lenet trained 2 epochs on 1,500 mnist-5k images; validated on 300 test images."""
    small = datasets.Dataset("mnist-5k", mnist.x_train[:1500], mnist.y_train[:1500],
                             mnist.x_test[:300], mnist.y_test[:300], mnist.class_names, "test")
    out = tmp_path_factory.mktemp("run")
    model = zoo.build("lenet")
    model.fit(small, epochs=2, batch_size=32, lr=3e-3, verbose=0, out=str(out))
    return out


@pytest.fixture(scope="module")
def lenet(run_dir):
    from cnnlab import load
    return load(run_dir)


def _build(layers, **weights):
    m = Sequential(layers)
    m.set_weights({**m.weights, **{k.replace("__", "."): np.asarray(v, np.float32)
                                   for k, v in weights.items()}})
    return m


# confusion matrix and per-class metrics ----------------------------------------------------
def test_confusion_matrix_sums_to_test_images_and_diagonal_gives_accuracy(lenet, mnist):
    probs = lenet.predict(mnist.x_test)
    cm, fig = ci.confusion_figure(mnist.y_test, probs.argmax(1), mnist.class_names)
    assert isinstance(fig, Figure) and cm.shape == (10, 10)
    assert cm.sum() == len(mnist.y_test) == 1000
    assert np.trace(cm) / cm.sum() == pytest.approx(evaluate(lenet, mnist)["accuracy"])
    np.testing.assert_array_equal(cm.sum(1), np.bincount(mnist.y_test, minlength=10))


def test_per_class_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    rows, _ = ci.per_class_figure(y, p, ["a", "b", "c"])
    a = rows[0]
    assert (a["precision"], a["recall"]) == (1.0, pytest.approx(2 / 3))
    assert a["accuracy"] == pytest.approx(5 / 6)        # one wrong: a 0 predicted as 1
    assert rows[1]["accuracy"] == pytest.approx(4 / 6)  # b: one false positive, one miss


def test_top_losses_are_mistakes_sorted_by_loss():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]], np.float32)
    y = np.array([0, 0, 1, 1])
    images = np.zeros((4, 4, 4, 1), np.uint8)
    idx, losses, _ = ci.top_losses(images, y, probs, ["a", "b"], k=5)
    assert list(idx) == [3, 1, 2]
    np.testing.assert_allclose(losses, -np.log([0.01, 0.2, 0.4]), rtol=1e-5)


def test_training_curves_read_the_run_history(run_dir):
    cols, fig = ci.training_curves(run_dir)
    assert list(cols["epoch"]) == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(cols)
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy"]
    assert len(fig.axes[0].lines) == 2  # training and validation


# attribution on hand-built models ------------------------------------------------------------
def _top_left_model():
    """8x8 grey -> 1x1 conv (identity) -> Dense(2, softmax): logit_0 = 0.25 * sum of the
    top-left 4x4 quadrant, logit_1 = 2. Nothing else matters."""
    dense = np.zeros((64, 2), np.float32)
    quadrant = np.zeros((8, 8), bool)
    quadrant[:4, :4] = True
    dense[quadrant.ravel(), 0] = 0.25
    return _build([Input((8, 8, 1)), Conv2D(1, 1), Flatten(), Dense(2, activation="softmax")],
                  conv2d__kernel=np.ones((1, 1, 1, 1)), dense__kernel=dense,
                  dense__bias=[0.0, 2.0])


@pytest.mark.parametrize("engine", ENGINES)
def test_occlusion_puts_the_largest_drop_where_the_model_looks(engine):
    model = _top_left_model()
    images = np.full((3, 8, 8, 1), 255, np.uint8)
    heat, fig = ci.occlusion(model, images, [0, 0, 0], patch=2, stride=1, engine=engine)
    assert heat.shape == (3, 8, 8) and isinstance(fig, Figure)
    for h in heat:
        i, j = np.unravel_index(h.argmax(), h.shape)
        assert i < 4 and j < 4
        assert h[:4, :4].min() > 0.05
        np.testing.assert_allclose(h[5:, :], 0, atol=1e-6)  # no patch there reaches the quadrant
        np.testing.assert_allclose(h[:, 5:], 0, atol=1e-6)
    # a 2x2 black patch inside the quadrant: logit_0 4 -> 3, p_0 = sigmoid(2) - sigmoid(1)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert heat[0, 1, 1] == pytest.approx(sig(2) - sig(1), abs=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_saliency_of_a_linear_model_is_its_weights(engine):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(6 * 6 * 2, 3)).astype(np.float32)
    for act in ("linear", "softmax"):  # softmax: saliency uses the logits before it
        model = _build([Input((6, 6, 2)), Flatten(), Dense(3, activation=act)],
                       dense__kernel=kernel, dense__bias=[0.1, -0.2, 0.3])
        images = rng.integers(0, 256, size=(4, 6, 6, 2)).astype(np.uint8)
        labels = np.array([0, 2, 1, 2])
        grads, _ = ci.saliency(model, images, labels, engine=engine)
        expected = kernel[:, labels].T.reshape(4, 6, 6, 2)
        np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-6)


def _two_region_model():
    """RGB 8x8 -> 1x1 conv (red -> channel 0, green -> channel 1, ReLU) -> global average
    -> Dense: class 0 reads channel 0, class 1 channel 1."""
    k = np.zeros((1, 1, 3, 2), np.float32)
    k[0, 0, 0, 0] = k[0, 0, 1, 1] = 1
    return _build([Input((8, 8, 3)), Conv2D(2, 1, activation="relu"), GlobalAvgPool2D(),
                   Dense(2, activation="softmax")],
                  conv2d__kernel=k, dense__kernel=np.eye(2) * 4)


@pytest.mark.parametrize("engine", ENGINES)
def test_grad_cam_highlights_the_region_that_drives_the_class(engine):
    img = np.zeros((1, 8, 8, 3), np.uint8)
    img[0, :4, :4, 0] = 255   # red square top-left: evidence for class 0
    img[0, 4:, 4:, 1] = 255   # green square bottom-right: evidence for class 1
    model = _two_region_model()
    for method in ("gradcam", "hirescam"):
        maps, _ = ci.grad_cam(model, np.repeat(img, 2, 0), [0, 1], method=method, engine=engine)
        assert maps.shape == (2, 8, 8) and maps.max() == pytest.approx(1)
        top_left, bottom_right = (slice(0, 4), slice(0, 4)), (slice(4, 8), slice(4, 8))
        for cam, region, other in [(maps[0], top_left, bottom_right),
                                   (maps[1], bottom_right, top_left)]:
            assert cam[region].sum() / cam.sum() > 0.95
            assert cam[region].min() > 0.9 and cam[other].max() == 0


# activation maximization ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_activation_maximization_beats_noise_and_real_images(lenet, mnist, engine):
    real = mnist.x_test[:300]
    imgs, acts, fig = ci.activation_maximization(lenet, "conv2d_1", range(6), steps=48,
                                                 real_images=real, engine=engine)
    assert imgs.shape == (6, 28, 28, 1) and 0 <= imgs.min() and imgs.max() <= 1
    assert (acts["reached"] > acts["start"] + 0.2).all()
    assert (acts["reached"] > 2 * np.maximum(acts["real_mean"], 0.01)).all()
    assert acts["reached"].mean() > acts["real_max"].mean()
    # the value reported is the value the images give back through the model
    np.testing.assert_allclose(ci.objective(lenet, "conv2d_1", range(6), imgs, engine=engine)
                               .diagonal(), acts["reached"], rtol=1e-4, atol=1e-5)
    assert "real test images" in fig.get_suptitle()


def test_class_maximization_reaches_logits_above_real_images(lenet, mnist):
    imgs, acts, _ = ci.activation_maximization(lenet, "logits", steps=48,
                                               real_images=mnist.x_test[:300])
    assert len(imgs) == 10
    assert (acts["reached"] > acts["real_max"]).all()
    assert (lenet.predict(imgs).argmax(1) == np.arange(10)).all()


def test_regularizer_helpers():
    u = np.random.default_rng(0).random((2, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(ci.gaussian_blur(np.full_like(u, 0.3), 1.0), 0.3, rtol=1e-5)
    blurred = ci.gaussian_blur(u, 1.0)
    assert blurred.std() < 0.6 * u.std() and blurred.mean() == pytest.approx(u.mean(), abs=0.02)


# other figures ------------------------------------------------------------------------------------
def test_feature_maps_and_filters(lenet, mnist):
    maps, fig = ci.feature_maps(lenet, mnist.x_test[0])
    assert {k: v.shape for k, v in maps.items()} == {"conv2d": (28, 28, 6),
                                                    "conv2d_1": (14, 14, 16)}
    assert (maps["conv2d"] >= 0).all()  # after ReLU
    kernel, fig = ci.filters_figure(lenet)
    np.testing.assert_array_equal(kernel, lenet.weights["conv2d.kernel"])
    assert "6 filters" in fig.get_suptitle()


# the report ---------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.sections, self.headings, self._h = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag in ("link", "script"):
            raise AssertionError(f"external resource: <{tag}>")
        self._h = tag == "h2"

    def handle_data(self, data):
        if self._h:
            self.headings.append(data)
            self._h = False


SECTIONS = ["summary", "training", "confusion", "per-class", "predictions", "mistakes",
            "filters", "feature-maps", "maximization", "occlusion", "saliency", "grad-cam"]


def test_report_renders_every_section_with_decodable_images(run_dir, lenet, capsys):
    # defaults: the data the model was trained on, <run dir>/report, the run's history.csv
    assert main(["report", str(run_dir), "--images", "8", "--steps", "8", "--filters", "4",
                 "--quiet"]) == 0
    path = run_dir / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = _Page()
    text = path.read_text(encoding="utf-8")
    page.feed(text)
    assert page.sections == SECTIONS  # "training" comes from the run's history.csv
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert len(page.images) == len(pngs) >= 15 and pngs[0] == "01-training-curves.png"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.width > 300 and img.height > 150
    acc = evaluate(lenet, "mnist-5k")["accuracy"]
    assert f"{acc:.4f}" in text and "mnist-5k: 1,000 images" in text
    assert "Most confused pairs" in text and "real max" in text


def test_report_of_a_dense_model_on_arrays_skips_the_conv_sections(mnist, tmp_path):
    model = Sequential([Input((28, 28, 1)), Flatten(), Dense(10, activation="softmax")])
    path = ci.write_report(model, (mnist.x_test[:60], mnist.y_test[:60]), tmp_path, images=4,
                           steps=2, progress=None)
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert page.sections == ["summary", "confusion", "per-class", "predictions", "mistakes",
                             "maximization", "occlusion", "saliency"]
    assert "arrays: 60 images" in path.read_text(encoding="utf-8")


def test_default_output_folders(tmp_path):
    from cnnlab.inspect.report import default_out
    assert default_out(tmp_path) == tmp_path / "report"
    assert default_out(tmp_path / "best.safetensors") == tmp_path / "report-best"


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model.safetensors"], "no such file"),
    (["{run}", "--data", "no-such-dataset"], "unknown dataset"),
    (["{run}", "--images", "0"], "--images"),
])
def test_report_cli_errors(run_dir, capsys, args, message):
    args = [a.format(run=run_dir) for a in args]
    assert main(["report", *args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err

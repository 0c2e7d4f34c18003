"""Grad-CAM: maps on the registry's gray-input classifiers, flatness, descriptions, rendering, backends."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from matplotlib.text import Text

from covidcxr.gradcam import EMPTY_NOTE, FLAT_NOTE, GradCAM, GradCAMError, overlay, render_cam
from covidcxr.models.classifier import build_classifier
from covidcxr.models.registry import get_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_BACKEND = "jax" if keras.backend.backend() != "jax" else "tensorflow"


def gray_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype("float32")


@pytest.fixture(scope="module")
def resnet():
    keras.utils.set_random_seed(0)  # fixed weights: the flat / not-flat verdicts below do not vary by run
    return build_classifier(get_spec("resnet50"), 3, 64, None)


@pytest.mark.parametrize("arch,size,grid", [("mobilenetv3small", 32, 1), ("resnet50", 64, 2), ("vit_b16", 32, 2)])
def test_heatmaps_on_registry_classifiers(arch, size, grid, resnet):
    keras.utils.set_random_seed(2)
    model = resnet if arch == "resnet50" else build_classifier(get_spec(arch), 3, size, None)
    x = gray_batch(2, size)
    result = GradCAM(model).explain(x)
    heat, probs = GradCAM(model).heatmaps(x)
    np.testing.assert_allclose(probs, np.asarray(model(x, training=False)), atol=1e-5)
    np.testing.assert_array_equal(heat, result.heatmaps)
    assert heat.shape == (2, grid, grid) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    assert result.flat.dtype == bool and result.flat.shape == (2,)
    np.testing.assert_allclose(probs[[0, 1], result.class_index], probs.max(axis=1))  # the top class is explained


@pytest.mark.parametrize("arch,size", [("mobilenetv3small", 32), ("vit_b16", 32)])
def test_compiled_pass_equals_the_eager_replay(arch, size):
    """The compiled forward/backward (from the second call, or from the first with compile=True) gives the
    eager replay's maps, probabilities and classes, for the predicted class and for chosen ones."""
    keras.utils.set_random_seed(3)
    model = build_classifier(get_spec(arch), 3, size, None)
    x = gray_batch(2, size, seed=4)
    eager, compiled, auto = GradCAM(model, compile=False), GradCAM(model, compile=True), GradCAM(model)
    for cls in (None, [2, 0]):
        want = eager.explain(x, cls)
        for cam in (compiled, auto, auto):
            got = cam.explain(x, cls)
            np.testing.assert_allclose(got.heatmaps, want.heatmaps, atol=1e-5)
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
            np.testing.assert_array_equal(got.class_index, want.class_index)
            np.testing.assert_array_equal(got.flat, want.flat)
    assert eager._compiled is None and compiled._compiled is not None and auto._compiled is not None
    assert list(auto.explain(x, [2, 0]).class_index) == [2, 0]


def test_inner_layer_gives_finer_map_and_is_described(resnet):
    x = gray_batch(2, 64, seed=1)
    last, inner = GradCAM(resnet), GradCAM(resnet, "conv4_block6_out")
    assert last.layer_name == "conv5_block3_out"
    assert inner.heatmaps(x)[0].shape == (2, 4, 4) and last.heatmaps(x)[0].shape == (2, 2, 2)
    assert last.describe() == ("the last feature block of the ResNet50 backbone (layer 'conv5_block3_out'): "
                               "a 2 x 2 grid over the 64 px input, each cell about 32 x 32 px")
    assert inner.describe(64).startswith("an inner layer of the ResNet50 backbone (layer 'conv4_block6_out')")
    assert "4 x 4 grid over the 64 px input, each cell about 16 x 16 px" in inner.describe(64)


def test_vit_tokens_on_patch_grid_described():
    cam = GradCAM(build_classifier(get_spec("vit_b16"), 3, 32, None))
    assert cam.grid == (2, 2)
    assert cam.describe().startswith("the last feature block of the ViT (vit_b16) backbone (layer 'vit_encoder')")
    assert "2 x 2 patch grid over the 32 px input" in cam.describe()
    assert "each cell about 16 x 16 px" in cam.describe()


def test_bad_layers_raise_with_candidates(resnet):
    with pytest.raises(GradCAMError, match="not found") as err:
        GradCAM(resnet, "no_such_layer")
    assert "conv5_block3_out" in str(err.value)  # the candidates are listed
    with pytest.raises(GradCAMError, match="feature map"):
        GradCAM(resnet, "gap")  # a pooled vector has no grid
    with pytest.raises(GradCAMError, match="out of range"):
        GradCAM(resnet).explain(gray_batch(1, 64), class_index=3)


def test_nested_sequential_matches_closed_form():
    """Sequential(Rescaling, nested ResNet50, GAP, Dense): the classic "graph disconnected" case.
    With GAP -> Dense the class-k map is relu(sum_c W[c, k] A_c) / (h w): check it exactly."""
    keras.utils.set_random_seed(1)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Rescaling(1 / 255.0), base,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
    dense = model.layers[-1]
    dense.kernel.assign(np.abs(np.asarray(dense.kernel)))  # positive evidence: a map that is not all zero
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    result = GradCAM(model).explain(x, class_index=1)
    np.testing.assert_allclose(result.probabilities, np.asarray(model(x)), atol=1e-5)
    acts = np.asarray(base(x / 255.0, training=False))
    raw = np.maximum(acts @ np.asarray(dense.kernel)[:, 1], 0) / 4
    np.testing.assert_allclose(result.raw_peak, raw.max(axis=(1, 2)), rtol=1e-4)
    np.testing.assert_allclose(result.heatmaps, raw / raw.max(axis=(1, 2), keepdims=True), atol=1e-4)
    inner = GradCAM(model, [layer.name for layer in base.layers if layer.name.endswith("_out")][-4])
    assert inner.heatmaps(x)[0].shape[1] > result.heatmaps.shape[1]
    assert "inner layer of the resnet50 backbone" in inner.describe()
    assert overlay(np.random.default_rng(0).random((100, 80)), result.heatmaps[0]).shape == (100, 80, 3)


def test_flat_maps_detected(resnet):
    x = gray_batch(2, 64, seed=2)
    assert not GradCAM(resnet).explain(x).flat.any()
    label = resnet.get_layer("label")
    kernel = np.asarray(label.kernel)
    label.kernel.assign(np.zeros_like(kernel))
    try:
        result = GradCAM(resnet).explain(x)
    finally:
        label.kernel.assign(kernel)
    assert result.flat.all() and (result.raw_peak == 0).all() and (result.heatmaps == 0).all()
    assert result.note(0) == EMPTY_NOTE


def test_evenly_spread_map_is_flat_with_its_note():
    """A 1x1 conv on a constant image gives the same evidence in every cell: flat, peak > 0."""
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(4, 1, kernel_initializer="ones", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", kernel_initializer="ones")(pooled),
                        name="tiny")
    cam = GradCAM(model)
    assert cam.layer_name == "features"
    x = np.stack([np.ones((8, 8, 1)), np.random.default_rng(0).random((8, 8, 1))]).astype("float32")
    result = cam.explain(x)
    np.testing.assert_array_equal(result.flat, [True, False])
    assert result.raw_peak[0] > 0 and np.allclose(result.heatmaps[0], 1)
    assert result.note(0) == FLAT_NOTE and result.note(1) is None
    assert cam.describe() == ("the last feature block of the tiny model (layer 'features'): "
                              "a 8 x 8 grid over the 8 px input, each cell about 1 x 1 px")


def test_render_cam_writes_figure_with_colour_bar_and_note(tmp_path, saved_figures):
    name = "covid_patient_0042_" + "x" * 60 + ".png"  # a long file name must wrap, not be cut
    out = render_cam(np.random.default_rng(0).random((64, 64)), np.random.default_rng(1).random((4, 4)),
                     tmp_path / "cam.png", ["true: COVID", "predicted: Normal 0.62", name], note=FLAT_NOTE)
    assert out.exists() and out.stat().st_size > 5000
    (fig,) = saved_figures
    assert len(fig.axes) == 2
    assert fig.axes[1].get_ylabel() == "relative importance (0-1)"
    assert "".join(fig.get_suptitle().split()).endswith("".join(name.split()))
    texts = {" ".join(t.get_text().split()): t for t in fig.findobj(Text) if t.get_visible()}
    assert FLAT_NOTE in texts  # the flat-map warning is drawn
    fig.canvas.draw()
    renderer, frame = fig.canvas.get_renderer(), fig.bbox
    for text in texts.values():
        box = text.get_window_extent(renderer)
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1


@pytest.mark.skipif(importlib.util.find_spec(OTHER_BACKEND) is None, reason=f"{OTHER_BACKEND} not installed")
def test_same_maps_on_another_backend(resnet, tmp_path):
    """Saved under this backend, loaded in a subprocess under another: the same maps and probabilities,
    and no TensorFlow imported by Grad-CAM there (when the other backend is not TensorFlow)."""
    x = gray_batch(2, 64, seed=3)
    resnet.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        import covidcxr.models.layers  # registers BackboneInput
        from covidcxr.gradcam import GradCAM
        model = keras.saving.load_model({str(tmp_path / 'model.keras')!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        last, inner = GradCAM(model).explain(x), GradCAM(model, "conv4_block6_out").explain(x)
        np.savez({str(tmp_path / 'out.npz')!r}, last=last.heatmaps, inner=inner.heatmaps, probs=last.probabilities,
                 no_stray_tf=keras.backend.backend() == "tensorflow" or "tensorflow" not in sys.modules)
    """)
    env = {**os.environ, "KERAS_BACKEND": OTHER_BACKEND, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["last"], GradCAM(resnet).heatmaps(x)[0], atol=1e-4)
    np.testing.assert_allclose(got["inner"], GradCAM(resnet, "conv4_block6_out").heatmaps(x)[0], atol=1e-4)
    np.testing.assert_allclose(got["probs"], np.asarray(resnet(x, training=False)), atol=1e-5)
    assert got["no_stray_tf"], f"TensorFlow was imported under {OTHER_BACKEND}"

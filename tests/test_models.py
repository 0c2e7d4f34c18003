from pathlib import Path

import numpy as np
import pytest

import keras

from covidcxr.errors import ConfigError
from covidcxr.models.classifier import build_classifier, freeze_backbone, get_backbone, iter_layers, unfreeze_top
from covidcxr.models.registry import arch_names, build_backbone, check_image_size, get_spec, verify_weights_file


def tiny_size(spec):
    base = max(spec.min_size, 32)
    return -(-base // spec.size_multiple) * spec.size_multiple  # smallest valid size >= 32


@pytest.mark.parametrize("name", [a for a in arch_names() if a not in ("medsiglip", "rad_dino")])
def test_every_arch_builds_and_trains_one_step(name):
    """Every registered backbone (the two foundation towers are exercised at tiny sizes in
    test_foundation_models.py: medsiglip is ~430M parameters)."""
    spec = get_spec(name)
    size = tiny_size(spec)
    model = build_classifier(spec, 3, size, None, bn_momentum=0.9)
    # Eager step: the same gradients without minutes of graph tracing for the large backbones.
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy", run_eagerly=True)
    x = (np.random.default_rng(0).random((2, size, size, 1)) * 255).astype("float32")  # gray, 0..255
    y = np.eye(3, dtype="float32")[[0, 2]]
    before = [w.numpy().copy() for w in model.trainable_weights[-2:]]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert model.output_shape == (None, 3)
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights[-2:]))
    layer_names = {l.name for l in get_backbone(model).layers}
    assert set(spec.skips) <= layer_names, f"skip layers missing for {name}"
    keras.backend.clear_session()


def test_unknown_arch_lists_choices():
    with pytest.raises(ConfigError, match="resnet50.*efficientnetb0"):
        get_spec("resnet9000")


def test_bad_image_size_for_swin():
    with pytest.raises(ConfigError, match="multiple of 224"):
        check_image_size(get_spec("swin_tiny"), 128)


def test_phase2_trains_more_weights_and_bn_stays_frozen():
    spec = get_spec("resnet50")
    model = build_classifier(spec, 4, 32, None)
    # Rebuild as a "pretrained" model: backbone called with training=False.
    import tempfile

    path = str(Path(tempfile.mkdtemp()) / "bb.weights.h5")
    get_backbone(model).save_weights(path)
    model = build_classifier(spec, 4, 32, path)
    freeze_backbone(model)
    n1 = len(model.trainable_weights)
    n_unfrozen = unfreeze_top(model, 30)
    n2 = len(model.trainable_weights)
    assert n_unfrozen > 0 and n2 > n1
    bns = [l for l in iter_layers(get_backbone(model)) if isinstance(l, keras.layers.BatchNormalization)]
    assert all(not l.trainable for l in bns)
    stats = [l.moving_mean.numpy().copy() for l in bns]
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="categorical_crossentropy")
    x = np.random.default_rng(1).random((4, 32, 32, 1)).astype("float32") * 255
    model.train_on_batch(x, np.eye(4, dtype="float32"))
    assert all(np.array_equal(s, l.moving_mean.numpy()) for s, l in zip(stats, bns))
    unfreeze_top(model, "all")
    assert len(model.trainable_weights) > n2


def test_weights_file_errors(tmp_path):
    spec = get_spec("resnet50")
    with pytest.raises(ConfigError, match="no such file"):
        verify_weights_file(spec, tmp_path / "missing.h5")
    fake = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    fake.write_bytes(b"not the real weights")
    with pytest.raises(ConfigError, match="does not match"):
        verify_weights_file(spec, fake)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot load it into resnet50"):
        build_backbone(spec, 32, str(junk))


def test_imagenet_failure_is_explained(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*a, **k):
        raise Exception("URL fetch failure: network unreachable")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ConfigError, match="--weights none"):
        build_backbone(get_spec("densenet121"), 32, "imagenet")


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf", "raw255", "unit", "clip"])
def test_backbone_input_layer_normalises_gray_uint8(mode):
    """The first layer of every model: gray 0..255 -> the backbone's RGB normalisation."""
    from covidcxr.models.layers import BackboneInput, normalization_params

    x = np.array([[[[0.0], [51.0], [255.0]]]], "float32")  # [1, 1, 3, 1]
    out = np.asarray(BackboneInput(mode)(x))
    scale, mean, std = normalization_params(mode)
    want = (x / 255.0 * scale - np.array(mean)) / np.array(std)
    assert out.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)
    if mode == "caffe":  # keras.applications' caffe preprocessing of an RGB image with R = G = B = 255
        np.testing.assert_allclose(out[0, 0, 2], [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-5)


LOAD = """
import sys
import numpy as np
import covidcxr
assert "keras" not in sys.modules and "tensorflow" not in sys.modules  # importing the package stays cheap
import keras
try:
    keras.saving.load_model(sys.argv[1])
    raise SystemExit("keras.saving.load_model loaded it without covidcxr's layers: the public loader is moot")
except TypeError:
    pass
for path in sys.argv[1:]:
    model = covidcxr.load_model(path)
    probs = model.predict(np.full((2, 32, 32, 1), 128, np.uint8), verbose=0)
    print(type(model).__name__, probs.shape, round(float(probs.sum()), 4))
"""


def test_public_loader_in_a_fresh_process(tmp_path):
    """covidcxr.load_model loads a saved model (file or folder) where keras.saving.load_model raises TypeError."""
    import subprocess
    import sys

    from covidcxr.artifacts import ModelCard

    spec = get_spec("mobilenetv3small")
    build_classifier(spec, 3, 32, None).save(tmp_path / "model.keras")
    ModelCard(["a", "b", "c"], spec.name, image_size=32, normalization=spec.normalization).save(tmp_path)
    keras.backend.clear_session()
    r = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "model.keras"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-2:] == ["Functional (2, 3) 2.0"] * 2

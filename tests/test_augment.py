"""Augmentation on the accelerator: image and mask move together, inference is untouched, seeded."""
import subprocess
import sys

import keras
import numpy as np
import pytest

from covidcxr.config import AugmentConfig
from covidcxr.augment import Augment, affine_matrices, fixed_view, sample_affine

STRONG = dict(rotation_deg=15, zoom=0.2, shift=0.1, hflip=True, brightness=0.0, contrast=0.0)


def _mask_batch():
    m = np.zeros((8, 48, 48, 1), np.float32)
    m[:, 10:30, 14:40] = 1.0
    m[:, 32:40, 6:12] = 1.0
    return m


def test_a_mask_drawn_from_the_image_stays_aligned():
    mask = _mask_batch()
    img, m = Augment(**STRONG, seed=3)(mask * 255.0, mask, training=True)
    img, m = keras.ops.convert_to_numpy(img), keras.ops.convert_to_numpy(m)
    assert ((img >= 127.5) == (m >= 0.5)).mean() > 0.995
    assert set(np.unique(m)) <= {0.0, 1.0}           # the mask stays binary
    assert not np.array_equal(m, mask)               # it did transform
    assert len({m[i].tobytes() for i in range(8)}) > 4  # one random matrix per image


def test_identity_at_inference_and_in_a_trainee():
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec
    from covidcxr.tasks import get_task
    from covidcxr.training.trainee import Trainee

    x = (np.random.default_rng(0).random((2, 32, 32, 1)) * 255).astype("float32")
    aug = Augment(seed=1)
    out, none = aug(x, None, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), x)
    assert none is None
    net = build_classifier(get_spec("mobilenetv3small"), 3, 32, None)
    tr = Trainee(net, aug, get_task("classify"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tr({"image": x}, training=False)["out"]),
                               keras.ops.convert_to_numpy(net(x, training=False)), atol=1e-6)


def test_seeded_and_photometric_ranges():
    x = np.full((4, 24, 24, 1), 128.0, np.float32)
    a1, _ = Augment(seed=5)(x, None, training=True)
    a2, _ = Augment(seed=5)(x, None, training=True)
    b, _ = Augment(seed=6)(x, None, training=True)
    a1, a2, b = (keras.ops.convert_to_numpy(t) for t in (a1, a2, b))
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, b) and a1.min() >= 0 and a1.max() <= 255
    bright = Augment(0, 0, 0, False, 0.2, 0.0, seed=0)
    y, _ = bright(x, None, training=True)
    y = keras.ops.convert_to_numpy(y)
    assert np.ptp(y.reshape(4, -1), axis=1).max() < 1e-4  # brightness shifts a whole image by one value
    assert np.abs(y - 128).max() <= 0.2 * 255 + 1e-3 and np.abs(y - 128).max() > 1


def test_affine_conventions_and_fixed_views():
    x = np.zeros((1, 9, 9, 1), np.float32)
    x[0, 4, 6] = 1.0  # right of centre
    one = np.ones(1, np.float32)
    flipped = keras.ops.convert_to_numpy(sample_affine(x, affine_matrices(9, one * 0, one, one, one * 0, one * 0,
                                                                          -one)))
    assert flipped[0, 4, 2, 0] == pytest.approx(1.0)  # mirrored about the centre column
    shifted = keras.ops.convert_to_numpy(sample_affine(x, affine_matrices(9, one * 0, one, one, one * 1, one * 0, one)))
    assert shifted[0, 4, 5, 0] == pytest.approx(1.0)  # output x reads input x + 1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fixed_view(x)), x)
    assert AugmentConfig.none().is_identity and not AugmentConfig().is_identity


def test_the_same_alignment_on_the_jax_backend(tmp_path):
    code = ("import numpy as np, keras; from covidcxr.augment import Augment\n"
            "m = np.zeros((8, 48, 48, 1), np.float32); m[:, 10:30, 14:40] = 1\n"
            f"i, k = Augment(**{STRONG!r}, seed=3)(m * 255, m, training=True)\n"
            "i, k = keras.ops.convert_to_numpy(i), keras.ops.convert_to_numpy(k)\n"
            "assert keras.backend.backend() == 'jax'\n"
            "print(((i >= 127.5) == (k >= 0.5)).mean(), set(np.unique(k).tolist()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "KERAS_BACKEND": "jax"})
    assert r.returncode == 0, r.stderr[-1500:]
    agree, values = r.stdout.split(" ", 1)
    assert float(agree) > 0.995 and values.strip() == "{0.0, 1.0}"

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidcxr.data import preprocess as P
from covidcxr.data.manifest import build_manifest
from covidcxr.data.pipeline import AugmentConfig, augment_batch, class_weights, make_dataset

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


@pytest.fixture(scope="module")
def manifest(synth_dir):
    df, _ = build_manifest(synth_dir, (0.5, 0.25, 0.25), seed=0, progress=False)
    return df


def test_classify_batches_shapes_and_weights(manifest):
    tr = manifest[manifest["split"] == "train"]
    cw = class_weights(tr["label"], CLASSES)
    ds = make_dataset(tr, CLASSES, image_size=32, normalization="torch", batch_size=4, training=True,
                      augment=AugmentConfig(), weights=cw)
    n = 0
    for x, y, w in ds:
        assert x.shape[1:] == (32, 32, 3) and y.shape[1:] == (4,)
        np.testing.assert_allclose(w.numpy(), [cw[CLASSES[i]] for i in np.argmax(y, 1)])
        n += len(x)
    assert n == len(tr)


def test_class_weights_balanced():
    w = class_weights(["a"] * 6 + ["b"] * 2, ["a", "b", "c"])
    assert w == pytest.approx({"a": 8 / 18, "b": 8 / 6, "c": 0.0})


def test_bad_file_is_skipped_not_fatal(manifest, tmp_path):
    df = manifest.copy()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    df.loc[df.index[3], "path"] = str(bad)
    ds = make_dataset(df, CLASSES, image_size=32, normalization="unit", batch_size=8, cache=None)
    assert sum(len(x) for x, _, _ in ds) == len(df) - 1


def test_missing_mask_gets_zero_weight_and_multitask_structure(manifest):
    df = manifest.head(6).copy()
    df.loc[df.index[:2], "lung_mask"] = ""
    x, y, w = next(iter(make_dataset(df, CLASSES, image_size=32, normalization="unit", batch_size=6,
                                     task="multitask")))
    assert set(y) == {"label", "mask"} and y["mask"].shape == (6, 32, 32, 1)
    np.testing.assert_array_equal(w["mask"].numpy(), [0, 0, 1, 1, 1, 1])
    assert float(tf.reduce_sum(y["mask"][0])) == 0.0 and float(tf.reduce_sum(y["mask"][2])) > 20
    assert set(np.unique(y["mask"].numpy())) <= {0.0, 1.0}


def test_augmentation_moves_image_and_mask_together():
    tf.random.set_seed(0)
    mask = np.zeros((8, 48, 48, 1), np.float32)
    mask[:, 10:30, 14:40] = 1.0
    img, m = augment_batch(tf.constant(mask), tf.constant(mask),
                           AugmentConfig(rotation_deg=15, zoom=0.2, shift=0.1, hflip=True, brightness=0, contrast=0))
    agree = ((img.numpy() >= 0.5) == (m.numpy() >= 0.5)).mean()
    assert agree > 0.995
    assert not np.array_equal(m.numpy(), mask)  # it did transform


def test_contrast_methods_and_normalisation():
    img = tf.constant(np.linspace(0.2, 0.6, 64 * 64, dtype=np.float32).reshape(64, 64, 1))
    for method in P.CONTRAST_METHODS:
        out = P.contrast(img, method).numpy()
        assert out.shape == (64, 64, 1) and out.min() >= 0 and out.max() <= 1.0 + 1e-6
    stretched = P.contrast(img, "stretch").numpy()
    assert stretched.min() == 0.0 and stretched.max() == 1.0
    narrow = tf.constant(np.random.default_rng(0).uniform(0.45, 0.55, (64, 64, 1)).astype(np.float32))
    eq = P.contrast(narrow, "clahe").numpy()
    assert eq.std() > 2 * narrow.numpy().std()  # spreads a narrow histogram
    g = P.contrast(tf.fill([8, 8, 1], 0.25), "gamma").numpy()
    np.testing.assert_allclose(g, 0.5, atol=1e-5)
    one = tf.ones([2, 2, 1])
    np.testing.assert_allclose(P.normalize(one, "tf").numpy(), 1.0)
    np.testing.assert_allclose(P.normalize(one, "raw255").numpy(), 255.0)
    np.testing.assert_allclose(P.normalize(one, "caffe").numpy()[0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68],
                               rtol=1e-5)
    np.testing.assert_allclose(P.normalize(one, "torch").numpy()[0, 0],
                               [(1 - .485) / .229, (1 - .456) / .224, (1 - .406) / .225], rtol=1e-5)


def test_decode_rgba_and_16bit_bytes(tmp_path):
    from PIL import Image

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 128, 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = P.decode_bytes(tf.io.read_file(str(tmp_path / "a.png"))).numpy()
    assert out.shape == (20, 30, 1)
    np.testing.assert_allclose(out, 128 / 255, atol=2e-3)
    arr = np.linspace(0, 1023, 400).reshape(20, 20).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "b.png")
    out = P.decode_bytes(tf.io.read_file(str(tmp_path / "b.png")), stretch=True).numpy()
    assert out.min() == 0 and out.max() == pytest.approx(1.0)

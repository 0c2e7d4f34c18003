"""SimCLR pretraining (covidcxr.pretrain): views in keras.ops, NT-Xent, precise BN, the CLI on
the TensorFlow and JAX backends, and fine-tuning from its weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidcxr import pretrain
from covidcxr.errors import DataError
from covidcxr.training import pretraining, simclr

ARGS = ["--arch", "mobilenetv3small", "--image-size", "32", "--batch-size", "8", "--workers", "1"]


def _images(synth_dir) -> list[str]:
    return sorted(str(f) for f in synth_dir.rglob("*.png") if "masks" not in f.parts)


@pytest.fixture(scope="module")
def pretrained(synth_dir, tmp_path_factory):
    """One TensorFlow-backend pretraining run (seed 0): (weights path, OUT.json, cache dir)."""
    d = tmp_path_factory.mktemp("simclr")
    w = d / "enc.weights.h5"
    assert pretrain.main([*ARGS, "--epochs", "2", "--data", str(synth_dir), "--out", str(w),
                          "--cache-dir", str(d / "cache")]) == 0
    return w, json.loads((d / "enc.weights.h5.json").read_text()), d / "cache"


def test_simclr_pretrain_then_fine_tune(pretrained, synth_dir, tmp_path, monkeypatch, capsys):
    from covidcxr import train

    w, meta, cache = pretrained
    monkeypatch.chdir(tmp_path)
    assert meta["arch"] == "mobilenetv3small" and meta["images"] == 32 and len(meta["loss"]) == 2
    assert meta["method"] == "simclr" and meta["image_size"] == 32 and meta["split"] == "train"
    assert all(np.isfinite(meta["loss"]))
    assert meta["batchnorm"] == "recomputed on 32 unaugmented images"
    assert pretrain.main([*ARGS, "--data", str(synth_dir), "--out", str(w)]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err
    tiny = ["--data", str(synth_dir), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
            "--fine-tune-epochs", "1", "--export-dir", "none", "--cache-dir", str(cache)]
    assert train.main(["--arch", "mobilenetv3small", "--weights", str(w), *tiny, "--run-dir", "ft"]) == 0
    import keras

    from covidcxr.models.registry import build_backbone, get_spec

    enc = build_backbone(get_spec("mobilenetv3small"), 32, str(w))
    ref = keras.saving.load_model(tmp_path / "ft" / "best.keras").get_layer("backbone")
    # phase 1 froze the encoder, phase 2 fine-tuned it: it started from the pretrained weights
    assert any(np.allclose(a.numpy(), b.numpy()) for a, b in zip(enc.weights, ref.weights))
    capsys.readouterr()
    assert train.main(["--arch", "resnet18", "--weights", str(w), *tiny, "--run-dir", "bad"]) == 2
    assert "mobilenetv3small weights" in capsys.readouterr().err


def _tiny_simclr(arch, image_size, projection_dim=128, hidden=512, seed=None):
    """A SimCLR model on a one-block encoder (conv, BatchNormalization): the pipeline at a fraction of the cost."""
    import keras

    enc = keras.Sequential([keras.Input((image_size, image_size, 3)), keras.layers.Conv2D(4, 3, strides=2),
                            keras.layers.BatchNormalization(), keras.layers.ReLU()])
    return simclr.SimCLR(enc, "unit", image_size, 8, 16, seed), enc


def test_same_seed_gives_the_same_loss_history(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining, "build_simclr", _tiny_simclr)

    def losses(name, seed):
        out = tmp_path / f"{name}.weights.h5"
        assert pretrain.main([*ARGS, "--epochs", "3", "--data", str(synth_dir), "--out", str(out), "--seed", str(seed),
                              "--cache-dir", str(tmp_path / "cache")]) == 0
        return json.loads((tmp_path / f"{name}.weights.h5.json").read_text())["loss"]

    first = losses("a", 0)
    assert losses("b", 0) == first and len(first) == 3
    assert losses("c", 1) != first


def test_jax_backend_pretrains_one_epoch(synth_dir, tmp_path):
    from covidcxr.models.registry import build_backbone, get_spec

    w = tmp_path / "jax.weights.h5"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    cmd = [sys.executable, "-m", "covidcxr.pretrain", *ARGS, "--epochs", "1", "--data", str(synth_dir), "--out", str(w),
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "jax backend" in proc.stdout and "recomputed on 32 unaugmented images" in proc.stdout
    meta = json.loads((tmp_path / "jax.weights.h5.json").read_text())
    assert len(meta["loss"]) == 1 and np.isfinite(meta["loss"][0])
    build_backbone(get_spec("mobilenetv3small"), 32, str(w))  # JAX-written weights load on this backend


def test_pretrain_manifest_uses_training_rows_only(synth_dir, tmp_path, capsys):
    files = _images(synth_dir)
    split = (["train", "val", "test"] * len(files))[: len(files)]
    man = tmp_path / "manifest.csv"
    pd.DataFrame({"path": files, "label": "x", "split": split}).to_csv(man, index=False)
    assert pretraining.image_paths(man) == [f for f, s in zip(files, split) if s == "train"]
    assert len(pretraining.image_paths(man, "train,val")) == split.count("train") + split.count("val")
    assert len(pretraining.image_paths(man, "all")) == len(files)
    with pytest.raises(DataError, match="holdout"):
        pretraining.image_paths(man, "holdout")
    assert pretrain.main(["--arch", "mobilenetv3small", "--data", str(man), "--split", "holdout",
                          "--image-size", "32", "--out", str(tmp_path / "x.weights.h5")]) == 2
    assert "holdout" in capsys.readouterr().err and not (tmp_path / "x.weights.h5").exists()
    # relative paths are relative to the manifest's folder; a folder leaves its mask folders out
    rel = synth_dir.parent / "rel.csv"
    pd.DataFrame({"path": [os.path.relpath(f, rel.parent) for f in files]}).to_csv(rel, index=False)
    assert pretraining.image_paths(rel) == files
    assert pretraining.image_paths(synth_dir) == files
    assert pretrain.main(["--arch", "mobilenetv3small", "--data", str(synth_dir), "--image-size", "32",
                          "--out", str(tmp_path / "x.h5")]) == 2
    assert ".weights.h5" in capsys.readouterr().err


def test_recalibrate_batchnorm_gives_population_statistics():
    import keras

    from covidcxr.training.simclr import recalibrate_batchnorm

    inp = keras.Input((3, 3, 2))
    bn = keras.layers.BatchNormalization(momentum=0.999)
    model = keras.Model(inp, bn(keras.layers.Dense(2, use_bias=False, kernel_initializer="identity")(inp)))
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=[5.0, -2.0], scale=[1.0, 3.0], size=(4, 3, 3, 2)).astype("float32") for _ in range(5)]
    assert recalibrate_batchnorm(model, iter(batches)) == 5
    allx = np.concatenate(batches).reshape(-1, 2)
    # the mean over batches of each batch's mean and (biased) variance: the population figures
    np.testing.assert_allclose(bn.moving_mean.numpy(), allx.mean(0), rtol=1e-5)
    want_var = np.mean([b.reshape(-1, 2).var(0) for b in batches], axis=0)
    np.testing.assert_allclose(bn.moving_variance.numpy(), want_var, rtol=1e-4)
    assert bn.momentum == 0.999  # restored
    # with the recalibrated statistics, inference-mode outputs are standardised
    out = model(np.concatenate(batches), training=False).numpy().reshape(-1, 2)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-3)
    assert recalibrate_batchnorm(model, iter(batches), max_batches=2) == 2


def test_nt_xent_prefers_matching_views():
    from covidcxr.training.simclr import nt_xent

    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 8)).astype("float32")
    loss = nt_xent(0.1)
    matched = float(loss(np.zeros(8), np.concatenate([z, z + 0.01])))
    shuffled = float(loss(np.zeros(8), np.concatenate([z, z[::-1] + 0.01])))
    assert matched < 0.1 < shuffled  # identical partners: near-zero loss; wrong partners: large


def _uniform(n, seed):
    import keras

    return keras.random.uniform((n, simclr.N_PARAMS), seed=keras.random.SeedGenerator(seed))


def test_views_of_one_image_differ_and_stay_in_range():
    import keras
    from keras import ops

    from tests.conftest import random_cxr

    size = 40
    img = random_cxr(0, simclr.load_size(size))[None, :, :, None].astype("float32")
    many = np.repeat(img, 8, axis=0)
    v = ops.convert_to_numpy(simclr.render_views(many, size, _uniform(8, 1)))
    assert v.shape == (8, size, size, 1) and v.min() >= 0.0 and v.max() <= 255.0
    assert min(np.abs(v[i] - v[j]).mean() for i in range(8) for j in range(i)) > 1.0
    again = ops.convert_to_numpy(simclr.render_views(many, size, _uniform(8, 1)))
    np.testing.assert_array_equal(v, again)  # seeded
    # the model's two views of an image differ too, and so do its next two
    enc = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Conv2D(4, 3)])
    model = simclr.SimCLR(enc, "unit", size, projection_dim=8, hidden=16, seed=0)
    z1 = ops.convert_to_numpy(model(img.astype("uint8"), training=True))
    z2 = ops.convert_to_numpy(model(img.astype("uint8"), training=True))
    assert z1.shape == (2, 8) and not np.allclose(z1[0], z1[1]) and not np.allclose(z1, z2)
    assert ops.convert_to_numpy(model(img, training=False)).shape == (1, 8)


def test_view_of_a_constant_image_is_constant_inside_the_crop():
    from keras import ops
    from scipy import ndimage

    size, n = 40, 16
    const = np.full((n, simclr.load_size(size), simclr.load_size(size), 1), 100.0, np.float32)
    u = _uniform(n, 3)
    v = ops.convert_to_numpy(simclr.render_views(const, size, u))[..., 0]
    # where the crop lies inside the image: the geometry alone (no photometric change, no blur) keeps 1
    geometry = ops.concatenate([u[:, :5], ops.full((n, 2), 0.5), ops.ones((n, 2))], axis=1)
    inside = ops.convert_to_numpy(simclr.render_views(const / 100.0, size, geometry))[..., 0] > 1 - 1e-4
    r = simclr.BLUR_RADIUS
    assert inside.mean() > 0.8
    for view, ins in zip(v, inside):
        core = ndimage.binary_erosion(ins, np.ones((2 * r + 1, 2 * r + 1)), border_value=1)
        assert core.mean() > 0.4 and np.ptp(view[core]) < 1e-3
    assert np.ptp(v[:, 10:30, 10:30].mean(axis=(1, 2))) > 1.0  # brightness/contrast vary between views
    plain = ops.convert_to_numpy(simclr.plain_views(const, size))
    np.testing.assert_allclose(plain, 100.0, atol=1e-4)  # the plain view: the whole image, unchanged


def test_blur_uses_each_images_own_sigma():
    from keras import ops
    from scipy import ndimage

    x = np.zeros((3, 21, 21, 1), np.float32)
    x[:, 10, 10] = 1.0
    sigma = np.array([0.0, 0.7, 1.5], np.float32)
    out = ops.convert_to_numpy(simclr.blur(x, sigma))
    np.testing.assert_allclose(out[0], x[0], atol=1e-6)  # sigma 0: unchanged
    for i in (1, 2):
        want = ndimage.gaussian_filter(x[i, :, :, 0], sigma[i], truncate=simclr.BLUR_RADIUS / sigma[i])
        np.testing.assert_allclose(out[i, :, :, 0], want, atol=1e-5)

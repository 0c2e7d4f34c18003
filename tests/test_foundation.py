"""Foundation encoders from keras-hub presets (local folders), linear probes, label fractions."""
import json

import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import ConfigError
from covidcxr.models.registry import PRESET, build_backbone, get_spec


def _tiny_dinov2(size=28):
    import keras_hub

    return keras_hub.models.DINOV2Backbone(patch_size=14, num_layers=1, hidden_dim=16, num_heads=2,
                                           intermediate_dim=32, image_shape=(size, size, 3))


def test_local_preset_folders_and_wrong_architecture(tmp_path):
    import keras_hub

    d = _tiny_dinov2()
    d.save_to_preset(str(tmp_path / "dino"))
    got = build_backbone(get_spec("dinov2_small"), 28, str(tmp_path / "dino"))
    x = np.random.default_rng(0).random((1, 28, 28, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(got(x)), np.asarray(d(x)), atol=1e-5)  # the saved weights came back

    # CLIP: a full CLIP preset gives its image tower.
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                                intermediate_dim=32, image_shape=(32, 32, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1,
                                            num_heads=2, intermediate_dim=32, max_sequence_length=8)
    keras_hub.models.CLIPBackbone(vision, text, projection_dim=8).save_to_preset(str(tmp_path / "clip"))
    enc = build_backbone(get_spec("clip_vit_b16"), 32, str(tmp_path / "clip"))
    assert type(enc).__name__ == "CLIPVisionEncoder"
    x32 = np.random.default_rng(1).random((1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(enc(x32)), np.asarray(vision(x32)), atol=1e-5)

    with pytest.raises(ConfigError, match="holds a DINOV2Backbone"):
        build_backbone(get_spec("vit_b16"), 32, str(tmp_path / "dino"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a keras-hub preset"):
        build_backbone(get_spec("dinov2_small"), 28, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="keras.applications"):
        build_backbone(get_spec("resnet50"), 32, PRESET + "whatever")
    with pytest.raises(ConfigError, match="--preset no_such_preset_x"):
        build_backbone(get_spec("dinov2_small"), 28, PRESET + "no_such_preset_x")


def test_label_subset_is_stratified_and_seeded():
    from covidcxr.train import label_subset

    df = pd.DataFrame({"path": [f"{i}.png" for i in range(200)],
                       "label": ["a"] * 120 + ["b"] * 60 + ["c"] * 20,
                       "split": (["train"] * 100 + ["val"] * 20) + (["train"] * 50 + ["val"] * 10) + ["train"] * 20})
    a, b = label_subset(df, 0.1, 7), label_subset(df, 0.1, 7)
    assert a.equals(b) and not a.equals(label_subset(df, 0.1, 8))
    counts = a[a["split"] == "train"]["label"].value_counts().to_dict()
    assert counts == {"a": 10, "b": 5, "c": 2}
    assert (a["split"] == "val").sum() == 30 and (a["split"] == "unused").sum() == 170 - 17


def test_linear_probe_on_a_local_preset_with_a_label_fraction(synth_dir, tmp_path, monkeypatch, capsys):
    from covidcxr import train

    monkeypatch.chdir(tmp_path)
    d = _tiny_dinov2(28)
    d.save_to_preset(str(tmp_path / "dino"))
    before = [w.numpy().copy() for w in d.weights]
    args = ["--data", str(synth_dir), "--arch", "dinov2_small", "--preset", str(tmp_path / "dino"),
            "--image-size", "28", "--batch-size", "8", "--epochs", "1", "--fine-tune-epochs", "2",
            "--freeze-encoder", "--label-fraction", "0.5", "--run-dir", "probe", "--export-dir", "none"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "linear probe; no fine-tuning phase" in out and "label fraction 0.5" in out
    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert cfg["freeze_encoder"] and cfg["label_fraction"] == 0.5 and cfg["weights"].endswith("dino")
    man = pd.read_csv(tmp_path / "probe" / "manifest.csv", keep_default_na=False)
    assert (man["split"] == "unused").sum() > 0
    hist = pd.read_csv(tmp_path / "probe" / "history.csv")
    assert len(hist) == 1  # no phase 2
    import keras

    model = keras.saving.load_model(tmp_path / "probe" / "best.keras")
    enc = model.get_layer("backbone")
    for a, b in zip(before, enc.weights):
        np.testing.assert_array_equal(a, b.numpy())  # the encoder never moved
    assert train.main(args[:-4] + ["--label-fraction", "0", "--run-dir", "p2"]) == 2
    assert train.main(["--data", str(synth_dir), "--arch", "dinov2_small", "--preset", "x", "--weights", "none",
                       "--run-dir", "p3"]) == 2


def _tiny_clip_preset(path):
    """A randomly initialised tiny CLIP (both towers) and a character-level tokenizer, as a preset folder."""
    import string

    import keras_hub

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "-,.()'":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["ab"], vocab["ab</w>"] = len(vocab), len(vocab) + 1
    tok = keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=["a b"])
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                                intermediate_dim=32, image_shape=(32, 32, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=len(vocab), embedding_dim=16, hidden_dim=16, num_layers=1,
                                            num_heads=2, intermediate_dim=32, max_sequence_length=24)
    keras_hub.models.CLIPBackbone(vision, text, projection_dim=8).save_to_preset(str(path))
    tok.save_to_preset(str(path))
    return path


def test_zero_shot_clip_end_to_end(synth_dir, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score

    from covidcxr import zeroshot

    preset = _tiny_clip_preset(tmp_path / "clip")
    out = tmp_path / "zs"
    assert zeroshot.main(["--preset", str(preset), "--data", str(synth_dir), "--split", "all", "--out", str(out),
                          "--bootstrap", "20"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv")
    assert m["n"] == len(pred) == 32 and len(m["prompts"]) == 4
    probs = pred[[f"prob_{c}" for c in m["classes"]]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert m["accuracy"] == accuracy_score(pred["true_label"], pred["pred_label"])
    assert abs(m["macro_f1"] - f1_score(pred["true_label"], pred["pred_label"], average="macro")) < 1e-12
    for f in ("confusion_matrix.png", "roc.png", "reliability.png", "report.html"):
        assert (out / f).exists()
    # prompt-ensemble embeddings are unit vectors, one per class
    backbone, tok = zeroshot.load_clip(str(preset))
    txt = zeroshot.text_embeddings(backbone, tok, {"a": ["x ray one", "x ray two"], "b": ["normal"]})
    assert txt.shape == (2, 8) and np.allclose(np.linalg.norm(txt, axis=1), 1)

    # bad input: prompt file naming a class the data lacks; preset folder without a tokenizer; unknown preset
    (tmp_path / "p.json").write_text(json.dumps({"COVID": ["a"], "Martian": ["b"]}))
    assert zeroshot.main(["--preset", str(preset), "--data", str(synth_dir), "--prompts", str(tmp_path / "p.json"),
                          "--out", str(tmp_path / "z2")]) == 2
    assert "Martian" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert zeroshot.main(["--preset", str(tmp_path / "half"), "--data", str(synth_dir), "--out",
                          str(tmp_path / "z3")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert zeroshot.main(["--preset", "no_such_clip_preset", "--data", str(synth_dir), "--out",
                          str(tmp_path / "z4")]) == 2
    assert not (tmp_path / "z2").exists() and not (tmp_path / "z4").exists()


def test_simclr_pretrain_then_fine_tune(synth_dir, tmp_path, monkeypatch, capsys):
    from covidcxr import pretrain, train

    monkeypatch.chdir(tmp_path)
    w = tmp_path / "enc.weights.h5"
    assert pretrain.main(["--arch", "mobilenetv3small", "--data", str(synth_dir), "--image-size", "32",
                          "--epochs", "2", "--batch-size", "8", "--out", str(w)]) == 0
    meta = json.loads((tmp_path / "enc.weights.h5.json").read_text())
    assert meta["arch"] == "mobilenetv3small" and meta["images"] == 32 and len(meta["loss"]) == 2
    assert all(np.isfinite(meta["loss"]))
    assert pretrain.main(["--arch", "mobilenetv3small", "--data", str(synth_dir), "--image-size", "32",
                          "--out", str(w)]) == 2  # never overwritten silently
    assert meta["batchnorm"] == "recomputed on 32 unaugmented images"
    capsys.readouterr()
    tiny = ["--data", str(synth_dir), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
            "--fine-tune-epochs", "1", "--export-dir", "none"]
    assert train.main(["--arch", "mobilenetv3small", "--weights", str(w), *tiny, "--run-dir", "ft"]) == 0
    import keras

    from covidcxr.models.registry import build_backbone, get_spec

    enc = build_backbone(get_spec("mobilenetv3small"), 32, str(w))
    ref = keras.saving.load_model(tmp_path / "ft" / "last.keras").get_layer("backbone")
    # phase 1 froze the encoder, phase 2 fine-tuned it: it started from the pretrained weights
    assert any(np.allclose(a.numpy(), b.numpy()) for a, b in zip(enc.weights, ref.weights))
    assert train.main(["--arch", "resnet18", "--weights", str(w), *tiny, "--run-dir", "bad"]) == 2
    assert "mobilenetv3small weights" in capsys.readouterr().err


def test_pretrain_manifest_uses_training_rows_only(synth_dir, tmp_path, capsys):
    from covidcxr import pretrain
    from covidcxr.predict import collect_inputs

    files = [str(f) for f in collect_inputs([str(synth_dir)])[0] if "masks" not in f.parts]
    split = (["train", "val", "test"] * len(files))[: len(files)]
    man = tmp_path / "manifest.csv"
    pd.DataFrame({"path": files, "label": "x", "split": split}).to_csv(man, index=False)
    assert pretrain.image_paths(man) == [f for f, s in zip(files, split) if s == "train"]
    assert len(pretrain.image_paths(man, "train,val")) == split.count("train") + split.count("val")
    assert len(pretrain.image_paths(man, "all")) == len(files)
    with pytest.raises(pretrain.DataError, match="holdout"):
        pretrain.image_paths(man, "holdout")
    assert pretrain.main(["--arch", "mobilenetv3small", "--data", str(man), "--split", "holdout",
                          "--image-size", "32", "--out", str(tmp_path / "x.weights.h5")]) == 2
    assert "holdout" in capsys.readouterr().err and not (tmp_path / "x.weights.h5").exists()


def test_recalibrate_batchnorm_gives_population_statistics():
    import keras

    from covidcxr.pretrain import recalibrate_batchnorm

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
    from covidcxr.pretrain import nt_xent

    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 8)).astype("float32")
    loss = nt_xent(0.1)
    matched = float(loss(np.zeros(8), np.concatenate([z, z + 0.01])))
    shuffled = float(loss(np.zeros(8), np.concatenate([z, z[::-1] + 0.01])))
    assert matched < 0.1 < shuffled  # identical partners: near-zero loss; wrong partners: large

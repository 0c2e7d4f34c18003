"""Foundation encoders from keras-hub presets (local folders), linear probes, label fractions."""
import json

import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import ConfigError
from covidcxr.models.registry import build_backbone, get_spec
from covidcxr.models.weights import PRESET


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
    from covidcxr.training.rows import label_subset

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
            "--freeze-encoder", "--label-fraction", "0.5", "--run-dir", "probe", "--export-dir", "none",
            "--cache-dir", str(tmp_path / "cache")]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "linear probe (the head on cached embeddings" in out and "label fraction 0.5" in out
    assert "0 of 32 images reused, 32 computed" in out
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
    # a second probe over the same encoder and images: every embedding comes from the cache
    assert train.main(args[:-6] + ["--run-dir", "probe2", "--export-dir", "none", "--cache-dir",
                                   str(tmp_path / "cache"), "--seed", "3"]) == 0
    assert "32 of 32 images reused, 0 computed" in capsys.readouterr().out
    assert train.main(args[:-6] + ["--label-fraction", "0", "--run-dir", "p2"]) == 2
    assert not (tmp_path / "p2").exists()  # a refused start leaves nothing behind
    assert train.main(["--data", str(synth_dir), "--arch", "dinov2_small", "--preset", "x", "--weights", "none",
                       "--run-dir", "p3"]) == 2



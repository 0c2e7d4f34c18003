"""Segmentation and multi-task models, losses, metrics, training and export (tiny sizes)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import ConfigError
from covidcxr.losses import MaskScore, bce_dice_loss, dice_loss, focal_loss, soft_dice
from covidcxr.models.segmentation import build_segmenter, seg_spec
from covidcxr.segmetrics import dice, hd95, iou, segmentation_metrics


def test_mask_figures_on_hand_made_masks():
    t = np.zeros((10, 10), bool)
    t[2:6, 2:6] = True            # 16 px
    p = np.zeros((10, 10), bool)
    p[2:6, 4:8] = True            # 16 px, 8 overlap
    assert dice(t, p) == pytest.approx(2 * 8 / 32)
    assert iou(t, p) == pytest.approx(8 / 24)
    assert dice(t, t) == 1.0 and iou(t, t) == 1.0 and hd95(t, t) == 0.0
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0 and np.isnan(hd95(t, np.zeros_like(t)))
    shifted = np.roll(t, 3, axis=1)
    assert hd95(t, shifted) == pytest.approx(3.0)
    m = segmentation_metrics(np.stack([t, t]), np.stack([p, t]).astype(float), labels=["A", "B"])
    assert m["dice"] == pytest.approx((0.5 + 1.0) / 2) and m["per_class"]["B"]["dice"] == 1.0


def test_losses_and_keras_metric_respect_zero_weights():
    t = np.zeros((2, 8, 8, 1), "float32")
    t[:, 2:6, 2:6] = 1
    perfect = t.copy()
    assert float(np.max(np.asarray(dice_loss(t, perfect)))) < 1e-6
    assert np.asarray(soft_dice(t, perfect)).shape == (2,)
    assert np.asarray(bce_dice_loss(t, perfect * 0.98 + 0.01)).shape == (2,)
    f = np.asarray(focal_loss(t, np.full_like(t, 0.5)))
    assert f.shape == (2,) and (f > 0).all()
    m = MaskScore("dice")
    wrong = np.zeros_like(t)
    m.update_state(t, np.concatenate([perfect[:1], wrong[:1]]), sample_weight=np.array([1.0, 0.0]))
    assert float(m.result()) == pytest.approx(1.0)  # the weight-0 image (no mask) is ignored
    m.update_state(t, wrong, sample_weight=np.array([1.0, 1.0]))
    assert float(m.result()) == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["unet", "unet_resnet50", "unetpp_efficientnetb0", "deeplabv3plus_densenet121",
                                  "unet_mobilenetv3small"])
def test_models_output_masks_at_input_resolution(name):
    seg = build_segmenter(name, 64, None)
    x = (np.random.default_rng(0).random((2, 64, 64, 1)) * 255).astype("float32")  # gray, 0..255
    y = np.asarray(seg(x))
    assert y.shape == (2, 64, 64, 1) and (y >= 0).all() and (y <= 1).all()
    mt = build_segmenter(name, 64, None, num_classes=3)
    out = mt(x)
    assert out["mask"].shape == (2, 64, 64, 1) and out["label"].shape == (2, 3)
    np.testing.assert_allclose(np.asarray(out["label"]).sum(1), 1, atol=1e-5)
    if name != "unet":
        assert mt.get_layer("backbone") is not None  # the two-phase schedule freezes it


def test_unetpp_deep_supervision_and_bad_names():
    m = build_segmenter("unetpp_resnet18", 64, None, deep_supervision=True)
    assert m.output.shape[1:] == (64, 64, 1)
    with pytest.raises(ConfigError, match="unknown segmentation architecture"):
        seg_spec("segformer_resnet50")
    with pytest.raises(ConfigError, match="no skip layers"):
        seg_spec("unet_vit_b16")
    with pytest.raises(ConfigError, match="multiple of"):
        build_segmenter("unet", 40, None)


def test_segment_and_multitask_training_end_to_end(synth_dir, tmp_path, monkeypatch):
    import tensorflow as tf

    from covidcxr import train

    monkeypatch.chdir(tmp_path)
    # Images without a mask: drop half of the masks from the manifest.
    from covidcxr.data.manifest import build_manifest

    df, _ = build_manifest(synth_dir, (0.7, 0.15, 0.15), progress=False)
    df.loc[df.index % 2 == 0, "lung_mask"] = ""
    df.to_csv(tmp_path / "half.csv", index=False)
    tiny = ["--image-size", "32", "--batch-size", "8", "--weights", "none", "--epochs", "1", "--fine-tune-epochs", "1"]
    assert train.main(["--data", str(tmp_path / "half.csv"), "--task", "segment", "--arch", "unet", *tiny,
                       "--run-dir", "seg", "--export-dir", "seg-export"]) == 0
    m = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert 0 <= m["val"]["segmentation"]["dice"] <= 1 and "hd95" in m["val"]["segmentation"]
    man = pd.read_csv(tmp_path / "seg" / "manifest.csv", keep_default_na=False)
    fp = np.load(tmp_path / "seg" / "train_fingerprints.npz")
    masked_train = int(((man["split"] == "train") & (man["lung_mask"] != "")).sum())
    # a segmenter trains on the images with masks only (the manifest still lists them all)
    assert (fp["role"] == 0).sum() == masked_train < (man["split"] == "train").sum()
    fn = tf.saved_model.load(str(tmp_path / "seg-export" / "serving" / "1")).signatures["serving_default"]
    from PIL import Image

    img = Image.open(df["path"][0]).resize((50, 70))
    img.save(tmp_path / "odd.png")
    res = fn(image_bytes=tf.constant([(tmp_path / "odd.png").read_bytes()]))
    assert tf.io.decode_png(res["mask_png"][0]).shape == (70, 50, 1)  # the input's own size
    assert res["mask"].shape == (1, 32, 32)

    assert train.main(["--data", str(tmp_path / "half.csv"), "--task", "multitask", "--arch",
                       "unet_mobilenetv3small", *tiny, "--loss-weights", "label=1,mask=0.5",
                       "--run-dir", "mt", "--export-dir", "none"]) == 0
    m = json.loads((tmp_path / "mt" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "segmentation"} <= set(m["val"])
    man = pd.read_csv(tmp_path / "mt" / "manifest.csv", keep_default_na=False)
    assert (man["lung_mask"] == "").any()  # multitask keeps images without masks (classifier only)
    hist = pd.read_csv(tmp_path / "mt" / "history.csv")
    assert {"accuracy", "dice", "label_loss", "mask_loss", "val_dice", "val_macro_f1"} <= set(hist.columns)

    _evaluate_and_predict_segmenters(tmp_path, df)
    _lung_crop_classifiers(tmp_path)


def _evaluate_and_predict_segmenters(tmp_path, df):
    """evaluate and predict on the segment run, its SavedModel and the multi-task run."""
    from PIL import Image

    from covidcxr import evaluate, predict
    from covidcxr.data.imageio import read_mask
    from covidcxr.segmetrics import dice

    from covidcxr.data.manifest import build_manifest

    full = tmp_path / "full.csv"  # every mask back, so every val image has one

    man, _ = build_manifest(Path(df["path"][0]).parents[2], (0.7, 0.15, 0.15), progress=False)
    man.to_csv(full, index=False)
    assert evaluate.main(["--model", str(tmp_path / "seg"), "--data", str(full), "--split", "val",
                          "--out", str(tmp_path / "ev-seg"), "--overlays", "3", "--bootstrap", "0"]) == 0
    m = json.loads((tmp_path / "ev-seg" / "metrics.json").read_text())
    seg = m["segmentation"]
    n_val = int((man["split"] == "val").sum())
    assert m["task"] == "segment" and seg["n"] == n_val and seg["target"] == "lung"
    assert set(seg["per_class"]) == set(man[man["split"] == "val"]["label"])
    assert sum(v["n"] for v in seg["per_class"].values()) == n_val
    assert 0 <= seg["dice"] <= 1 and 0 <= seg["iou"] <= seg["dice"] + 1e-9  # IoU <= Dice per image
    assert "accuracy" not in m and seg["ci95"] is None  # --bootstrap 0
    ov = list((tmp_path / "ev-seg" / "overlays").rglob("*.png"))
    assert 3 <= len(ov) <= 3 + len(seg["per_class"]) and (tmp_path / "ev-seg" / "segmentation.png").exists()
    assert Image.open(ov[0]).size == (64, 64)  # drawn at the X-ray's own size
    assert "Segmentation: lung masks" in (tmp_path / "ev-seg" / "report.html").read_text()

    # predict: one mask PNG per input at its own size; its Dice agrees with evaluate's.
    val = man[man["split"] == "val"].sort_values("path").reset_index(drop=True)  # predict writes rows in path order
    inputs = [str(p) for p in val["path"]]
    assert predict.main(["--model", str(tmp_path / "seg"), *inputs, "--out", str(tmp_path / "p.csv")]) == 0
    pr = pd.read_csv(tmp_path / "p.csv")
    assert list(pr.columns) == ["path", "mask_path", "mask_fraction", "height", "width"] and len(pr) == len(val)
    d = []
    for path, mpath in zip(pr["path"], pr["mask_path"]):
        got = np.asarray(Image.open(mpath))
        assert got.shape == (64, 64) and set(np.unique(got)) <= {0, 255}
        d.append(dice(read_mask(val.set_index("path")["lung_mask"][path]), got > 0))
    assert abs(np.mean(d) - seg["dice"]) < 0.02
    # the SavedModel gives the same masks
    assert predict.main(["--model", str(tmp_path / "seg-export" / "serving" / "1"), *inputs[:2],
                         "--out", str(tmp_path / "q.csv"), "--masks", str(tmp_path / "qm")]) == 0
    for a, b in zip(pd.read_csv(tmp_path / "q.csv")["mask_path"], pr["mask_path"][:2]):
        assert (np.asarray(Image.open(a)) != np.asarray(Image.open(b))).mean() < 0.01
    assert predict.main(["--model", str(tmp_path / "seg"), *inputs[:1], "--out", str(tmp_path / "p.csv")]) == 2
    assert predict.main(["--model", str(tmp_path / "seg"), *inputs[:1], "--out", str(tmp_path / "r.csv"),
                         "--calibrated"]) == 2
    # flags that do not apply to a segmenter are refused, not ignored; --bootstrap gives Dice/IoU intervals
    for flag in (["--tta"], ["--mask-lungs"], ["--gradcam", "2"], ["--label-map", "a=b"]):
        assert evaluate.main(["--model", str(tmp_path / "seg"), "--data", str(full), "--out",
                              str(tmp_path / "ev-bad"), *flag]) == 2, flag
    assert evaluate.main(["--model", str(tmp_path / "seg"), "--data", str(full), "--split", "val", "--out",
                          str(tmp_path / "ev-ci"), "--overlays", "0", "--bootstrap", "50"]) == 0
    ci = json.loads((tmp_path / "ev-ci" / "metrics.json").read_text())["segmentation"]["ci95"]
    assert ci["dice"]["low"] <= seg["dice"] <= ci["dice"]["high"]
    # the SavedModel evaluates too
    assert evaluate.main(["--model", str(tmp_path / "seg-export" / "serving" / "1"), "--data", str(full),
                          "--split", "val", "--out", str(tmp_path / "ev-sm"), "--overlays", "0"]) == 0
    m2 = json.loads((tmp_path / "ev-sm" / "metrics.json").read_text())
    assert abs(m2["segmentation"]["dice"] - seg["dice"]) < 0.02

    # multi-task: classification figures and mask figures in one evaluation; predict writes both.
    assert evaluate.main(["--model", str(tmp_path / "mt"), "--data", str(full), "--split", "val",
                          "--out", str(tmp_path / "ev-mt"), "--overlays", "2", "--bootstrap", "20"]) == 0
    m = json.loads((tmp_path / "ev-mt" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "ece", "per_class", "segmentation"} <= set(m) and m["task"] == "multitask"
    assert m["segmentation"]["n"] == n_val and m["gradcam"] is None
    preds = pd.read_csv(tmp_path / "ev-mt" / "predictions.csv")
    assert abs((preds["true_label"] == preds["pred_label"]).mean() - m["accuracy"]) < 1e-12
    for f in ("confusion_matrix.png", "roc.png", "segmentation.png", "report.html"):
        assert (tmp_path / "ev-mt" / f).exists(), f
    assert predict.main(["--model", str(tmp_path / "mt"), *inputs[:3], "--out", str(tmp_path / "mt.csv")]) == 0
    pr = pd.read_csv(tmp_path / "mt.csv")
    assert {"label", "mask_path", "mask_fraction"} <= set(pr.columns) and len(pr) == 3
    assert all(Path(x).exists() for x in pr["mask_path"])


def test_segment_refuses_missing_targets(synth_dir, tmp_path, monkeypatch, capsys):
    from covidcxr import train

    monkeypatch.chdir(tmp_path)
    rc = train.main(["--data", str(synth_dir), "--task", "segment", "--target", "infection", "--arch", "unet",
                     "--image-size", "32", "--weights", "none", "--run-dir", "x"])
    assert rc == 2 and "no infection masks" in capsys.readouterr().err
    rc = train.main(["--data", str(synth_dir), "--task", "multitask", "--arch", "unet", "--loss-weights", "a=1",
                     "--image-size", "32", "--weights", "none", "--run-dir", "y"])
    assert rc == 2 and "--loss-weights" in capsys.readouterr().err
    rc = train.main(["--data", str(synth_dir), "--task", "segment", "--arch", "unet_nosuch", "--run-dir", "z"])
    assert rc == 2 and "unknown architecture" in capsys.readouterr().err


def _same_pixels_served(export_dir, items):
    """The SavedModel's own input pixels (after its lung crop) equal the host's, file by file."""
    from covidcxr.inference import Predictor

    host = next(Predictor(export_dir, batch_size=len(items)).run(items))
    served = next(Predictor(export_dir, batch_size=len(items), prefer="savedmodel").run(items, pixels=True))
    assert len(served.done) == len(items) and np.array_equal(host.x, served.x)
    assert np.array_equal(host.x[..., 0] > 0, (served.x[..., 0] > 0))  # the crop itself, not only the image
    assert np.abs(host.probs - served.probs).max() < 1e-4


def _lung_crop_classifiers(tmp_path):
    """--lung-crop with the segment run's predicted masks and with the given masks: train, export
    (the SavedModel crops by itself / takes the mask), predict and evaluate agree."""
    import tensorflow as tf
    from PIL import Image

    from covidcxr import evaluate, predict, train

    tiny = ["--arch", "mobilenetv3small", "--image-size", "32", "--batch-size", "8", "--weights", "none",
            "--epochs", "1", "--fine-tune-epochs", "0"]
    full = tmp_path / "full.csv"
    assert train.main(["--data", str(full), *tiny, "--lung-crop", str(tmp_path / "seg"), "--run-dir", "crop",
                       "--export-dir", "crop-export"]) == 0
    man = pd.read_csv(tmp_path / "crop" / "manifest.csv", keep_default_na=False)
    assert (man["crop_mask"] != "").all() and (tmp_path / "crop" / "lung_segmenter" / "model.keras").exists()
    m0 = np.asarray(Image.open(man["crop_mask"][0]))
    assert m0.shape == (32, 32) and set(np.unique(m0)) <= {0, 255}
    assert (tmp_path / "crop-export" / "lung_segmenter" / "model.keras").exists()
    card = json.loads((tmp_path / "crop" / "model_card.json").read_text())
    assert card["lung_crop"] == "model"
    val = man[man["split"] == "val"]["path"].tolist()
    # Keras run and the SavedModel (which runs the segmenter inside) give the same probabilities.
    assert predict.main(["--model", str(tmp_path / "crop"), *val, "--out", str(tmp_path / "c1.csv")]) == 0
    assert predict.main(["--model", str(tmp_path / "crop-export" / "serving" / "1"), *val,
                         "--out", str(tmp_path / "c2.csv")]) == 0
    a, b = pd.read_csv(tmp_path / "c1.csv"), pd.read_csv(tmp_path / "c2.csv")
    cols = [c for c in a.columns if c.startswith("prob_")]
    assert np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() < 1e-4
    from covidcxr.inference import Item

    _same_pixels_served(tmp_path / "crop-export", [Item(v) for v in val])
    # evaluate agrees with predict; the lungs-out probe does not apply to a lung-cropped classifier: refused
    assert evaluate.main(["--model", str(tmp_path / "crop"), "--data", str(full), "--split", "val", "--out",
                          str(tmp_path / "ev-crop"), "--bootstrap", "0", "--gradcam", "1"]) == 0
    ev = pd.read_csv(tmp_path / "ev-crop" / "predictions.csv").set_index("path").loc[a["path"]]
    assert np.abs(ev[cols].to_numpy() - a[cols].to_numpy()).max() < 1e-4
    assert evaluate.main(["--model", str(tmp_path / "crop"), "--data", str(full), "--split", "val", "--out",
                          str(tmp_path / "ev-crop2"), "--mask-lungs"]) == 2

    # Given masks: refused when some image has none; the export then takes the mask as a second input.
    assert train.main(["--data", str(tmp_path / "half.csv"), *tiny, "--lung-crop", "--run-dir", "g0"]) == 2
    assert train.main(["--data", str(full), *tiny, "--lung-crop", "given", "--run-dir", "given",
                       "--export-dir", "given-export"]) == 0
    fn = tf.saved_model.load(str(tmp_path / "given-export" / "serving" / "1")).signatures["serving_default"]
    assert set(fn.structured_input_signature[1]) == {"image_bytes", "lung_mask_bytes"}
    masks = tmp_path / "lungmasks"
    masks.mkdir()
    fm = pd.read_csv(full, keep_default_na=False).set_index("path")
    for v in val:
        (masks / Path(v).name).write_bytes(Path(fm["lung_mask"][v]).read_bytes())
    assert predict.main(["--model", str(tmp_path / "given"), *val, "--out", str(tmp_path / "g.csv")]) == 2
    assert predict.main(["--model", str(tmp_path / "given"), *val, "--out", str(tmp_path / "g.csv"),
                         "--lung-masks", str(masks)]) == 0
    assert predict.main(["--model", str(tmp_path / "given-export" / "serving" / "1"), *val,
                         "--out", str(tmp_path / "g2.csv"), "--lung-masks", str(masks)]) == 0
    a, b = pd.read_csv(tmp_path / "g.csv"), pd.read_csv(tmp_path / "g2.csv")
    assert np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() < 1e-4
    _same_pixels_served(tmp_path / "given-export", [Item(v, fm["lung_mask"][v]) for v in val])

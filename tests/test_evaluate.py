"""Evaluation: every figure's definition on hand-made cases, every plot written,
Grad-CAM on nested and transformer models, and the CLI end to end."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covidcxr import evaluate as ev
from covidcxr.calibration import apply_temperature, ece, fit_temperature, nll, reliability_bins
from covidcxr.metrics import _fast_auc, bootstrap_ci, cosine_similarity, covid_class, headline
from tests.conftest import shared_path

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


# ------------------------------------------------------------ definitions on hand-made cases


def test_ece_hand_case():
    # Two bins used: conf 0.9 (2 images, 1 right) and conf 0.6 (2 images, 2 right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    # bin of 0.9: |0.5 - 0.9| * 2/4 = 0.2 ; bin of 0.6: |1.0 - 0.6| * 2/4 = 0.2
    assert ece(y, probs) == pytest.approx(0.4)
    b = reliability_bins(y, probs)
    assert sum(b["count"]) == 4 and b["accuracy"][13] == 0.5 and b["accuracy"][8] == 1.0
    assert ece(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0


def test_temperature_scaling_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (400, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-12)
    t2 = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(p, 2.0), t2, atol=1e-12)
    # Labels drawn from softmax(logits / 2.5): the fit recovers about 2.5 and minimises the NLL.
    y = np.array([rng.choice(3, p=row) for row in apply_temperature(p, 2.5)])
    t = fit_temperature(y, p)
    assert 1.8 < t < 3.4
    assert nll(y, apply_temperature(p, t)) <= min(nll(y, apply_temperature(p, t * f)) for f in (0.9, 1.1))
    assert ece(y, apply_temperature(p, t)) < ece(y, p)


def test_cosine_auc_covid_name_and_headline():
    probs = np.array([[0.6, 0.8], [1.0, 0.0]])  # rows are not normalised on purpose
    assert cosine_similarity(np.array([1, 0]), probs) == pytest.approx((0.8 / 1.0 + 1.0) / 2)
    rng = np.random.default_rng(1)
    yb, s = rng.integers(0, 2, 200), np.round(rng.random(200), 1)  # ties
    assert _fast_auc(yb, s) == pytest.approx(skm.roc_auc_score(yb, s), abs=1e-12)
    assert covid_class(["Non-COVID", "COVID-19", "Normal"]) == "COVID-19"
    assert covid_class(["NORMAL", "PNEUMONIA"]) is None
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    h = headline(y, p, 3, covid=0)
    assert h["accuracy"] == pytest.approx(4 / 6)
    assert h["macro_f1"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))
    assert h["covid_sensitivity"] == 0.5


def test_bootstrap_is_seeded_stratified_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 25)
    p = np.eye(4)[y] * 0.3 + rng.random((100, 4)) * 0.7
    a = bootstrap_ci(y, p, CLASSES, n=200, seed=3)
    b = bootstrap_ci(y, p, CLASSES, n=200, seed=3)
    assert a == b and a["covid_class"] == "COVID"
    point = headline(y, p, 4, 0)
    for k in ("accuracy", "macro_f1", "macro_auc", "covid_sensitivity"):
        assert a[k]["low"] <= point[k] <= a[k]["high"], k
    assert a["accuracy"]["high"] > a["accuracy"]["low"]
    # Perfect predictions: every stratified replicate is perfect, so the interval collapses.
    perfect = bootstrap_ci(y, np.eye(4)[y], CLASSES, n=50, seed=0)
    assert perfect["accuracy"] == {"low": 1.0, "high": 1.0, "n": 50}


def test_figures_match_sklearn_and_plots_are_written(tmp_path):
    from covidcxr import plots

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(4), 10)
    p = rng.dirichlet(np.ones(4), 40) * 0.6 + np.eye(4)[y] * 0.4
    m = ev.figures(y, p, CLASSES, bootstrap=20)
    assert m["accuracy"] == skm.accuracy_score(y, p.argmax(1))
    assert m["macro_f1"] == skm.f1_score(y, p.argmax(1), average="macro")
    assert m["macro_auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == i, p[:, i]) for i in range(4)]))
    assert m["micro_auc"] == skm.roc_auc_score(np.eye(4)[y].ravel(), p.ravel())
    assert {"ci95", "ece", "nll", "cosine_similarity", "per_class", "confusion_matrix"} <= set(m)
    written = [
        plots.plot_confusion(m["confusion_matrix"], CLASSES, tmp_path / "cm.png"),
        plots.plot_roc(y, p, CLASSES, tmp_path / "roc.png"),
        plots.plot_pr(y, p, CLASSES, tmp_path / "pr.png"),
        plots.plot_reliability(m["reliability"], reliability_bins(y, apply_temperature(p, 2)), m["ece"], 0.1, 2.0,
                               tmp_path / "rel.png"),
        plots.plot_image_grid([("row", [(rng.random((8, 8)), "a", "green"), (rng.random((8, 8, 3)), "b", "red")])],
                              tmp_path / "grid.png"),
    ]
    for f in written:
        assert f.exists() and f.stat().st_size > 2000, f


# ------------------------------------------------------------ Grad-CAM


@pytest.mark.parametrize("arch,size", [("resnet50", 64), ("efficientnetb0", 64), ("vit_b16", 32)])
def test_gradcam_on_registry_classifiers(arch, size):
    from covidcxr.gradcam import GradCAM
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    model = build_classifier(get_spec(arch), 3, size, None)
    x = np.random.default_rng(0).random((2, size, size, 3)).astype("float32")
    cam = GradCAM(model)
    heat, probs = cam.heatmaps(x)
    np.testing.assert_allclose(probs, np.asarray(model(x, training=False)), atol=1e-5)
    assert heat.ndim == 3 and heat.shape[0] == 2 and heat.shape[1] == heat.shape[2] >= 1
    assert heat.min() >= 0 and heat.max() <= 1


def test_gradcam_nested_sequential_model_and_bad_layer():
    import keras

    from covidcxr.gradcam import GradCAM, GradCAMError, overlay

    base = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(64, 64, 3))
    model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Rescaling(1.0), base,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(1).random((1, 64, 64, 3)).astype("float32")
    heat, probs = GradCAM(model).heatmaps(x)  # the classic "graph disconnected" case
    np.testing.assert_allclose(probs, np.asarray(model(x)), atol=1e-5)
    inner = [layer.name for layer in base.layers if "conv" in layer.name][-3]
    heat2, _ = GradCAM(model, inner).heatmaps(x)
    assert heat2.shape[1] >= heat.shape[1]
    with pytest.raises(GradCAMError, match="not found"):
        GradCAM(model, "no_such_layer")
    ov = overlay(np.random.default_rng(0).random((100, 80)), heat[0])
    assert ov.shape == (100, 80, 3) and ov.dtype == np.uint8


# ------------------------------------------------------------ CLI end to end


@pytest.fixture(scope="module")
def tiny_run(synth_dir, tmp_path_factory):
    from covidcxr import train

    root = tmp_path_factory.mktemp("evalrun")
    rc = train.main(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                     "--fine-tune-epochs", "1", "--image-size", "32", "--batch-size", "8",
                     "--run-dir", str(root / "run"), "--export-dir", str(root / "export")])
    assert rc == 0
    return root


def test_evaluate_cli_writes_everything_and_figures_agree_with_sklearn(tiny_run, tmp_path, capsys):
    run = tiny_run / "run"
    out = tmp_path / "ev"
    rc = ev.main(["--model", str(run), "--data", str(run / "manifest.csv"), "--split", "test", "--out", str(out),
                  "--bootstrap", "50", "--tta", "--mask-lungs", "--gradcam", "2"])
    assert rc == 0, capsys.readouterr().err
    for f in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "pr.png", "reliability.png",
              "examples.png", "gradcam.png", "training_curves.png", "report.html", "calibration.json"):
        assert (out / f).exists(), f
    assert not (tmp_path / "ev.partial").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema"] == ev.SCHEMA and m["split"] == "test"
    assert {"accuracy", "macro_f1", "macro_auc", "ece", "per_class", "ci95", "cosine_similarity"} <= set(m)
    # Recompute from predictions.csv with sklearn: exact agreement.
    pred = pd.read_csv(out / "predictions.csv")
    classes = m["classes"]
    assert list(pred.columns) == ["path", "true_label", "pred_label"] + [f"prob_{c}" for c in classes]
    y = pred["true_label"].map(classes.index).to_numpy()
    p = pred[[f"prob_{c}" for c in classes]].to_numpy()
    yhat = pred["pred_label"].map(classes.index).to_numpy()
    assert (yhat == p.argmax(1)).all()
    assert m["n"] == len(pred) == int((pd.read_csv(run / "manifest.csv")["split"] == "test").sum())
    assert m["accuracy"] == skm.accuracy_score(y, yhat)
    assert m["macro_f1"] == skm.f1_score(y, yhat, average="macro", labels=range(len(classes)), zero_division=0)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, yhat, labels=range(len(classes))).tolist()
    for i, c in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            assert m["per_class"][c]["roc_auc"] == skm.roc_auc_score(y == i, p[:, i])
            assert m["per_class"][c]["average_precision"] == skm.average_precision_score(y == i, p[:, i])
    assert m["ece"] == ece(y, p)
    # Calibration fitted on the validation split; TTA and the shortcut probe reported.
    assert m["calibration"]["temperature"] > 0 and "validation split" in m["calibration"]["fitted_on"]
    assert len(m["tta"]["views"]) == 4 and 0 <= m["tta"]["accuracy"] <= 1
    assert m["mask_lungs"]["n"] == m["n"] and m["mask_lungs"]["verdict"]  # synthetic data: every image has a mask
    assert len(m["gradcam"]["files"]) == sum(min(2, int((y == i).sum())) for i in range(len(classes)))
    assert all((out / f).exists() for f in m["gradcam"]["files"])
    html = (out / "report.html").read_text()
    assert "research only, not for diagnosis" in html and html.count("data:image/png;base64") >= 7
    assert "Shortcut probe" in html
    # The temperature went beside the model; predict --calibrated applies it.
    assert json.loads((run / "calibration.json").read_text())["temperature"] == m["calibration"]["temperature"]

    # Never overwrite without --overwrite.
    assert ev.main(["--model", str(run), "--data", str(run / "manifest.csv"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_predict_calibrated_and_gradcam(tiny_run, synth_dir, tmp_path, capsys):
    from covidcxr import predict
    from covidcxr.calibration import save_temperature

    run = tiny_run / "run"
    imgs = sorted(Path(synth_dir, "COVID", "images").glob("*.png"))[:3]
    assert predict.main(["--model", str(run), *map(str, imgs), "--out", str(tmp_path / "a.csv")]) == 0
    cal = save_temperature(tmp_path / "cal.json", 3.0, "test", 10, 0.2, 0.1)
    assert predict.main(["--model", str(run), *map(str, imgs), "--out", str(tmp_path / "b.csv"), "--calibrated",
                         "--calibration", str(cal), "--gradcam", str(tmp_path / "cams")]) == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    cols = [c for c in a.columns if c.startswith("prob_")]
    np.testing.assert_allclose(b[cols].to_numpy(), apply_temperature(a[cols].to_numpy(), 3.0), atol=1e-6)
    assert (a["label"] == b["label"]).all()
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 3
    # --calibrated without any calibration file: clear error.
    rc = predict.main(["--model", str(tiny_run / "export"), str(imgs[0]), "--out", str(tmp_path / "c.csv"),
                       "--calibrated"])
    assert rc == 2 and "calibration.json" in capsys.readouterr().err


def test_evaluate_bad_inputs(tiny_run, tmp_path, capsys):
    from tests.conftest import random_cxr, write_png

    run = tiny_run / "run"
    other = tmp_path / "other"
    for c in ("CATS", "DOGS"):
        for i in range(2):
            write_png(other / c / f"{i}.png", random_cxr(i))
    cases = [
        (["--data", str(other)], "none of the model's classes"),
        (["--data", str(run / "manifest.csv"), "--split", "train", "--gradcam-layer", "nope"], "not found"),
        (["--data", str(tmp_path / "missing")], "no such file"),
    ]
    # A manifest whose test split is empty.
    man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    man[man["split"] != "test"].to_csv(tmp_path / "notest.csv", index=False)
    cases.append((["--data", str(tmp_path / "notest.csv"), "--split", "test"], "is empty"))
    # A class the model does not know.
    extra = man.copy()
    extra.loc[0, "label"] = "Tuberculosis"
    extra.to_csv(tmp_path / "extra.csv", index=False)
    cases.append((["--data", str(tmp_path / "extra.csv"), "--split", "all"], "does not know"))
    for args, msg in cases:
        out = tmp_path / "out"
        rc = ev.main(["--model", str(run), "--out", str(out), "--bootstrap", "0", *args])
        assert rc == 2, args
        assert msg in capsys.readouterr().err, args
        assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_evaluate_python_api(tiny_run):
    import keras

    from covidcxr.data.pipeline import make_dataset

    run = tiny_run / "run"
    labels = json.loads((run / "labels.json").read_text())
    man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    ds = make_dataset(man[man["split"] == "test"], labels["classes"], image_size=32,
                      normalization=labels["normalization"], batch_size=8)
    m = ev.evaluate(keras.saving.load_model(run / "best.keras"), ds, labels["classes"], bootstrap=10)
    assert 0 <= m["accuracy"] <= 1 and m["n"] == int((man["split"] == "test").sum()) and "ci95" in m


def test_evaluate_real_covid_qu_ex_val_split(tmp_path):
    """A tiny model trained on real COVID-QU-Ex images, evaluated on the sample's Val split
    with the lung-masking probe (COVID-QU-Ex has lung masks for every image)."""
    from covidcxr import train

    data = shared_path("covid-qu-ex-sample")
    assert train.main(["--data", str(data), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                       "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "16",
                       "--run-dir", str(tmp_path / "run"), "--export-dir", "none"]) == 0
    out = tmp_path / "ev"
    assert ev.main(["--model", str(tmp_path / "run"), "--data", str(data), "--split", "val", "--out", str(out),
                    "--bootstrap", "20", "--mask-lungs", "--gradcam", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 60 and set(m["classes"]) == {"COVID-19", "Non-COVID", "Normal"}
    assert m["ci95"]["covid_class"] == "COVID-19" and m["mask_lungs"]["n"] == 60
    assert m["data_summary"]["duplicate_groups_crossing_splits"] == 1  # the known same-film pair
    assert "optimistic" in m["calibration"]["fitted_on"]

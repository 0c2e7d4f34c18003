"""Evaluation: every figure's definition on hand-made cases, every plot written, and the CLI end
to end: run-aware splits, the training-overlap guard, external validation, nothing silent."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covidcxr import evaluate as ev
from covidcxr.evaluation import figures as F
from covidcxr.evaluation.report import SCHEMA
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
    m = F.classification(y, p, CLASSES, bootstrap=20)
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


def test_probe_verdict_only_for_a_model_above_chance():
    from covidcxr.evaluation.checks import verdict

    at_chance = {"macro_auc": 0.458, "accuracy": 0.3, "ci95": {"macro_auc": {"low": 0.35, "high": 0.57}}}
    v = verdict(at_chance, {"macro_auc": 0.521, "accuracy": 0.33}, 3)  # AUC went *up* without the lungs
    assert v.startswith("not applicable") and "OK" not in v
    good = {"macro_auc": 0.9, "accuracy": 0.8, "ci95": {"macro_auc": {"low": 0.82, "high": 0.95}}}
    assert verdict(good, {"macro_auc": 0.55, "accuracy": 0.4}, 3).startswith("OK")
    assert verdict(good, {"macro_auc": 0.85, "accuracy": 0.7}, 3).startswith("WARNING")


def test_label_maps():
    from covidcxr.errors import ConfigError
    from covidcxr.evaluation.data import parse_label_map

    lm = parse_label_map("COVID-19=COVID,Normal=Normal,Non-COVID=Lung_Opacity+Viral Pneumonia",
                         ["COVID-19", "Non-COVID", "Normal"], ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"])
    assert lm.names == ["COVID-19", "Normal", "Non-COVID"] and lm.data_label("Viral Pneumonia") == "Non-COVID"
    np.testing.assert_allclose(lm.probs(np.array([[0.2, 0.5, 0.3]])), [[0.2, 0.3, 0.5]])
    rev = parse_label_map("COVID=COVID-19,Normal=Normal,Lung_Opacity+Viral Pneumonia=Non-COVID",
                          ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"], ["COVID-19", "Non-COVID", "Normal"])
    np.testing.assert_allclose(rev.probs(np.array([[0.1, 0.2, 0.3, 0.4]])), [[0.1, 0.3, 0.6]])
    for bad, msg in (("COVID-19=COVID", "not mapped"), ("COVID-19=Cats,Normal=Normal", "not classes of the data"),
                     ("COVID-19=COVID,Normal=COVID", "more than once"), ("nonsense", "MODEL_CLASS=DATA_CLASS")):
        with pytest.raises(ConfigError, match=msg):
            parse_label_map(bad, ["COVID-19", "Normal"], ["COVID", "Normal"])


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
    rc = ev.main(["--model", str(run), "--out", str(out), "--bootstrap", "50", "--tta", "--mask-lungs",
                  "--gradcam", "2"])   # no --data: the run's own held-out split
    assert rc == 0, capsys.readouterr().err
    for f in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "pr.png", "reliability.png",
              "examples.png", "gradcam.png", "training_curves.png", "report.html", "calibration.json"):
        assert (out / f).exists(), f
    assert not (tmp_path / "ev.partial").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema"] == SCHEMA and m["split"] == "test" and m["train_overlap"]["checked"]
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    classes = m["classes"]
    own = ["path", "true_label", "pred_label"] + [f"prob_{c}" for c in classes] + ["train_overlap"]
    assert list(pred.columns[:len(own)]) == own   # then the metadata columns the manifest has
    assert set(pred.columns[len(own):]) <= {"patient_id", "study_id", "view", "sex", "age", "site", "manufacturer",
                                           "age_band"}
    y = pred["true_label"].map(classes.index).to_numpy()
    p = pred[[f"prob_{c}" for c in classes]].to_numpy()
    yhat = pred["pred_label"].map(classes.index).to_numpy()
    man = pd.read_csv(run / "manifest.csv")
    assert m["n"] == len(pred) == int((man["split"] == "test").sum())
    assert m["accuracy"] == skm.accuracy_score(y, yhat) and (yhat == p.argmax(1)).all()
    assert m["macro_f1"] == skm.f1_score(y, yhat, average="macro", labels=range(len(classes)), zero_division=0)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, yhat, labels=range(len(classes))).tolist()
    for i, c in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            assert m["per_class"][c]["roc_auc"] == skm.roc_auc_score(y == i, p[:, i])
    assert m["ece"] == ece(y, p)
    assert m["calibration"]["temperature"] > 0 and "validation split" in m["calibration"]["fitted_on"]
    assert len(m["tta"]["views"]) == 4 and m["mask_lungs"]["n"] == m["n"] and m["mask_lungs"]["verdict"]
    g = m["gradcam"]
    assert len(g["files"]) == sum(min(2, int((y == i).sum())) for i in range(len(classes)))
    assert all((out / f).exists() for f in g["files"]) and "grid over the 32 px input" in g["layer_description"]
    html = (out / "report.html").read_text()
    assert "research only, not for diagnosis" in html and "Shortcut probe" in html and "n=" in html
    assert json.loads((run / "calibration.json").read_text())["temperature"] == m["calibration"]["temperature"]
    assert ev.main(["--model", str(run), "--out", str(out)]) == 2  # never overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_run_aware_splits_and_the_training_overlap_guard(tiny_run, synth_dir, tmp_path, capsys):
    run = tiny_run / "run"
    man = pd.read_csv(run / "manifest.csv")
    # The run's data folder: its own held-out split, not every image (861 of 1,230 had trained it).
    assert ev.main(["--model", str(run), "--data", str(synth_dir), "--out", str(tmp_path / "a"), "--bootstrap",
                    "0", "--gradcam", "0"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert a["split"] == "test" and a["n"] == int((man["split"] == "test").sum())
    assert ev.main(["--model", str(run), "--data", str(synth_dir), "--split", "val", "--out", str(tmp_path / "v"),
                    "--bootstrap", "0", "--gradcam", "0"]) == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["n"] == int((man["split"] == "val").sum())
    capsys.readouterr()
    # Another copy of the same images (no split of its own): the training images are found and left out.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synth_dir, copy)
    assert ev.main(["--model", str(tiny_run / "export"), "--data", str(copy), "--out", str(tmp_path / "c"),
                    "--bootstrap", "0", "--gradcam", "0"]) == 0
    out = capsys.readouterr().out
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    n_train = int((man["split"] == "train").sum())
    assert c["split"] == "all" and c["train_overlap"]["matched"] == n_train and c["n"] == len(man) - n_train
    assert f"{n_train} of {len(man)} images match an image that trained this model" in out
    ov = pd.read_csv(tmp_path / "c" / "train_overlap.csv")
    assert (ov["role"] == "train").sum() == n_train and (ov["role"] == "val").sum() == (man["split"] == "val").sum()
    assert ev.main(["--model", str(tiny_run / "export"), "--data", str(copy), "--out", str(tmp_path / "i"),
                    "--bootstrap", "0", "--gradcam", "0", "--include-train-overlap"]) == 0
    i = json.loads((tmp_path / "i" / "metrics.json").read_text())
    assert i["n"] == len(man) and i["train_overlap"]["included"] and "INCLUDED" in capsys.readouterr().out
    assert "optimistic" in (tmp_path / "i" / "report.html").read_text()


def _plant_val_copy_of_a_training_image(src: Path, run: Path) -> str:
    """Copy run ``src`` to ``run`` with one more validation image: a training image shifted by one pixel,
    in its manifest and, as a validation image, in its fingerprints (as training would have put it)."""
    import shutil

    from PIL import Image

    from covidcxr.data.imageio import inspect_file
    from tests.conftest import write_png

    shutil.copytree(src, run)
    man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    row = man[man["split"] == "train"].iloc[0].copy()
    gray = np.asarray(Image.open(row["path"]).convert("L"))
    shifted = np.concatenate([gray[:, :1], gray[:, :-1]], axis=1)   # 1 px to the right
    path = str(write_png(run.parent / "val_copy.png", shifted))
    info = inspect_file(path)
    row["path"], row["split"], row["sha256"] = path, "val", info.sha256
    pd.concat([man, row.to_frame().T]).to_csv(run / "manifest.csv", index=False)
    fp = dict(np.load(run / "train_fingerprints.npz"))
    add = {"sha": np.frombuffer(bytes.fromhex(info.sha256), np.uint8), "phash": np.uint64(info.phash),
           "phash_mirror": np.uint64(info.phash_mirror), "role": np.uint8(1), "known": True,
           "thumbs16": info.thumb.reshape(16, 2, 16, 2).mean(axis=(1, 3)).round().astype(np.uint8)}
    fp = {k: np.concatenate([v, np.asarray(add[k], v.dtype)[None]]) for k, v in fp.items()}
    np.savez_compressed(run / "train_fingerprints.npz", **fp)
    return path


def test_a_validation_copy_of_a_training_image_is_training_overlap(tiny_run, tmp_path, capsys):
    """Its exact match with itself (a validation image in the run's fingerprints) must not hide its
    near-duplicate match with the training image: it is reported and left out as training overlap."""
    run = tmp_path / "run"
    copy = _plant_val_copy_of_a_training_image(tiny_run / "run", run)
    n_val = int((pd.read_csv(run / "manifest.csv")["split"] == "val").sum())
    out = tmp_path / "ev"
    assert ev.main(["--model", str(run), "--split", "val", "--out", str(out), "--bootstrap", "0", "--gradcam",
                    "0", "--quiet"]) == 0
    assert f"1 of {n_val} images match an image that trained this model" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    ov = m["train_overlap"]
    assert (ov["matched"], ov["excluded"], ov["train_and_validation_matched"]) == (1, 1, 1)
    assert ov["validation_matched"] == n_val and ov["validation_scored"] == n_val - 1 == m["n"]
    assert m["checkpoint_images"]["n"] == n_val - 1 and "a training image too" in ov["summary"]
    table = pd.read_csv(out / "train_overlap.csv", keep_default_na=False).set_index("path")
    assert table.loc[copy].to_dict() == {"role": "train", "match": "near", "train_match": "near",
                                         "validation_match": "exact"}
    assert (table.drop(copy)["role"] == "val").all() and len(table) == n_val
    assert copy not in pd.read_csv(out / "predictions.csv")["path"].tolist()
    assert ev.main(["--model", str(run), "--split", "val", "--out", str(tmp_path / "i"), "--bootstrap", "0",
                    "--gradcam", "0", "--quiet", "--include-train-overlap"]) == 0
    pred = pd.read_csv(tmp_path / "i" / "predictions.csv", keep_default_na=False).set_index("path")
    assert pred.loc[copy, "train_overlap"] == "train:near+val:exact" and len(pred) == n_val
    assert json.loads((tmp_path / "i" / "metrics.json").read_text())["checkpoint_images"]["n"] == n_val


def test_external_validation_with_a_label_map(tiny_run, synth_dir, tmp_path):
    from tests.conftest import random_cxr, write_png

    ext = tmp_path / "ext"  # another dataset's class names, new images
    for c, k in (("covid", 3), ("other", 4), ("healthy", 3)):
        for i in range(k):
            write_png(ext / c / f"{c}{i}.png", random_cxr(100 + 10 * len(c) + i, 64))
    lm = "COVID=covid,Normal=healthy,Lung_Opacity+Viral Pneumonia=other"
    assert ev.main(["--model", str(tiny_run / "run"), "--data", str(ext), "--label-map", lm, "--out",
                    str(tmp_path / "e"), "--bootstrap", "0", "--gradcam", "1"]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["external"] and m["classes"] == ["COVID", "Normal", "Lung_Opacity+Viral Pneumonia"] and m["n"] == 10
    pred = pd.read_csv(tmp_path / "e" / "predictions.csv")
    assert set(pred["true_label"]) == {"covid", "other", "healthy"}
    np.testing.assert_allclose(pred.filter(like="prob_").sum(1), 1, atol=1e-6)
    assert "EXTERNAL validation" in (tmp_path / "e" / "report.html").read_text()
    assert ev.main(["--model", str(tiny_run / "run"), "--data", str(ext), "--out", str(tmp_path / "x")]) == 2


def test_evaluate_bad_inputs(tiny_run, tmp_path, capsys, monkeypatch):
    from tests.conftest import random_cxr, write_png

    run = tiny_run / "run"
    other = tmp_path / "other"
    for c in ("CATS", "DOGS"):
        for i in range(2):
            write_png(other / c / f"{i}.png", random_cxr(i))
    man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    man[man["split"] != "test"].to_csv(tmp_path / "notest.csv", index=False)
    extra = man.copy()
    extra.loc[0, "label"] = "Tuberculosis"
    extra.to_csv(tmp_path / "extra.csv", index=False)
    cases = [(["--data", str(other)], "none of the model's classes"),
             (["--data", str(tmp_path / "missing")], "no such file"),
             (["--data", str(tmp_path / "notest.csv"), "--split", "test"], "is empty"),
             (["--data", str(tmp_path / "extra.csv"), "--split", "all"], "does not know"),
             (["--gradcam-layer", "nope"], "not found"),
             (["--overlays", "3"], "do(es) not apply")]
    for args, msg in cases:
        out = tmp_path / "out"
        assert ev.main(["--model", str(run), "--out", str(out), "--bootstrap", "0", *args]) == 2, args
        assert msg in capsys.readouterr().err, args
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    # A file deleted after indexing: listed with the right reason, the rest scored.
    gone = man[man["split"] == "test"]["path"].iloc[0]
    import shutil

    shutil.copy(gone, tmp_path / "keep.png")
    try:
        Path(gone).unlink()
        assert ev.main(["--model", str(run), "--out", str(tmp_path / "s"), "--bootstrap", "0", "--gradcam", "0"]) == 0
        assert "file not found" in capsys.readouterr().out
        assert pd.read_csv(tmp_path / "s" / "skipped.csv")["path"].tolist() == [gone]
    finally:
        shutil.copy(tmp_path / "keep.png", gone)
    # Ctrl-C: exit 130, nothing half-written left.
    from covidcxr.evaluation import evaluator

    monkeypatch.setattr(evaluator, "forward", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert ev.main(["--model", str(run), "--out", str(tmp_path / "k")]) == 130
    assert not (tmp_path / "k").exists() and not (tmp_path / "k.partial").exists()


def test_evaluate_real_covid_qu_ex_val_split(tmp_path):
    """A tiny model trained on real COVID-QU-Ex images, evaluated on the sample's Val split with the
    lung-masking probe; the sample's known same-film pair (Train covid_1177 / Val covid_2022) is caught."""
    from covidcxr import train

    data = shared_path("covid-qu-ex-sample")
    assert train.main(["--data", str(data), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                       "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "16",
                       "--run-dir", str(tmp_path / "run"), "--export-dir", "none"]) == 0
    out = tmp_path / "ev"
    assert ev.main(["--model", str(tmp_path / "run"), "--data", str(data), "--split", "val", "--out", str(out),
                    "--bootstrap", "20", "--mask-lungs", "--gradcam", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["classes"]) == {"COVID-19", "Non-COVID", "Normal"} and m["mask_lungs"]["n"] == m["n"]
    ov = pd.read_csv(out / "train_overlap.csv", keep_default_na=False)
    assert m["n"] == 60 - m["train_overlap"]["excluded"]
    # covid_2022 is a Val image (an exact match with itself) and the same film as Train covid_1177: overlap.
    pair = ov[ov["path"].str.endswith("Val/COVID-19/images/covid_2022.png")].iloc[0]
    assert (pair["role"], pair["train_match"], pair["validation_match"]) == ("train", "near", "exact")
    assert m["train_overlap"]["excluded"] >= 1 and m["train_overlap"]["train_and_validation_matched"] >= 1
    assert not pd.read_csv(out / "predictions.csv")["path"].str.endswith("covid_2022.png").any()
    assert m["checkpoint_images"]["n"] == m["n"]  # every scored image is a validation image
    assert m["ci95"]["covid_class"] == "COVID-19"


def test_val_only_data_says_it_scores_the_checkpoints_own_images(tiny_run, tmp_path, capsys):
    """Data with only train and val (COVID-QU-Ex folders often come so): --split auto scores val, the images
    that chose the checkpoint. metrics.json's warnings and the first lines of report.html say so; every
    classification report shows the majority-class baseline; the probe judges against it."""
    run = tiny_run / "run"
    man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    man[man["split"] != "test"].to_csv(tmp_path / "trainval.csv", index=False)
    out = tmp_path / "ev"
    assert ev.main(["--model", str(run), "--data", str(tmp_path / "trainval.csv"), "--out", str(out), "--bootstrap",
                    "30", "--gradcam", "0", "--mask-lungs"]) == 0
    assert "WARNING: SCORING THE CHECKPOINT'S OWN IMAGES" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    n_val = int((man["split"] == "val").sum())
    assert m["split"] == "val" and m["n"] == n_val and m["checkpoint_images"]["n"] == n_val
    assert "chose its checkpoint" in m["warnings"][0] and "no test split" in m["warnings"][0]
    html = (out / "report.html").read_text()
    first = "\n".join(html.splitlines()[:2])
    assert 'class="alarm"' in first and "chose its checkpoint" in first and html.index("alarm\"") < html.index("<h1")
    # the majority-class baseline: always the most frequent true class of the scored set
    pred = pd.read_csv(out / "predictions.csv")
    top = pred["true_label"].value_counts()
    base = m["majority_baseline"]
    assert base["accuracy"] == top.iloc[0] / len(pred) and top[base["class"]] == top.iloc[0]
    assert base["macro_f1"] == skm.f1_score(pred["true_label"], [base["class"]] * len(pred), average="macro",
                                            labels=m["classes"], zero_division=0)
    assert "majority-class baseline (always predicting" in html
    probe = m["mask_lungs"]
    assert probe["majority_baseline"] == base and probe["bootstrap_replicates"] == 200
    assert probe["lungs_masked"]["ci95"]["macro_auc"] is not None and "majority class" in probe["verdict"]
    assert "1/" not in probe["verdict"] and "chance 0.25" not in probe["verdict"]


def _one_class_checks(m: dict, out: Path, cls: str, n: int) -> None:
    one = m["single_class"]
    pred = pd.read_csv(out / "predictions.csv")
    assert m["n"] == one["n"] == len(pred) == n and one["class"] == cls
    assert one["sensitivity"] == (pred["pred_label"] == cls).mean() == one["correct"] / n
    assert one["predicted_counts"] == {c: int((pred["pred_label"] == c).sum()) for c in m["classes"]}
    assert one["sensitivity_ci95"]["low"] <= one["sensitivity"] <= one["sensitivity_ci95"]["high"]
    p = pred[f"prob_{cls}"]
    assert abs(one["probability"]["mean"] - p.mean()) < 1e-12 and sum(one["probability"]["histogram"]["counts"]) == n
    assert abs(one["probability"]["quantiles"]["50%"] - p.median()) < 1e-12
    assert any(k.startswith("ROC-AUC") for k in one["not_computable"])
    assert f"specificity of {cls}" in one["not_computable"]
    assert "accuracy" not in m and any("only one class" in w for w in m["warnings"])
    assert (out / "probabilities.png").exists() and not (out / "roc.png").exists()
    html = (out / "report.html").read_text()
    assert f"One class only: {cls}" in html and "Cannot be computed on one class" in html and "ROC-AUC" in html


def test_an_external_set_of_one_class_is_scored_not_refused(tiny_run, tmp_path, capsys):
    from tests.conftest import random_cxr, write_png

    ext = tmp_path / "ext"  # only positives of one data class, scored with a label map naming absent classes
    for i in range(6):
        write_png(ext / "opacity" / "images" / f"o{i}.png", random_cxr(300 + i, 64))
    lm = "COVID=covid,Normal=healthy,Lung_Opacity+Viral Pneumonia=opacity"
    out = tmp_path / "e"
    assert ev.main(["--model", str(tiny_run / "run"), "--data", str(ext), "--label-map", lm, "--out", str(out),
                    "--bootstrap", "20", "--gradcam", "1", "--tta"]) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["external"] and m["label_map"]["absent"] == ["covid", "healthy"]
    _one_class_checks(m, out, "Lung_Opacity+Viral Pneumonia", 6)
    assert set(m["single_class"]["other_classes"]) == {"COVID", "Normal"} and m["tta"] is not None
    assert "one class only" in capsys.readouterr().out
    # no label map: a manifest holding one of the model's own classes
    paths = [write_png(tmp_path / "one" / f"n{i}.png", random_cxr(400 + i, 64)) for i in range(5)]
    pd.DataFrame({"path": paths, "label": "Normal", "split": "test"}).to_csv(tmp_path / "one.csv", index=False)
    assert ev.main(["--model", str(tiny_run / "run"), "--data", str(tmp_path / "one.csv"), "--out",
                    str(tmp_path / "k"), "--bootstrap", "0", "--gradcam", "0"]) == 0, capsys.readouterr().err
    _one_class_checks(json.loads((tmp_path / "k" / "metrics.json").read_text()), tmp_path / "k", "Normal", 5)


def test_real_lung_opacity_films_alone_are_scored(tiny_run, tmp_path):
    """cxr-sample's 130 real Lung_Opacity films, alone (a symlinked one-class Kaggle folder)."""
    src = shared_path("cxr-sample") / "Lung_Opacity"
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "Lung_Opacity").symlink_to(src, target_is_directory=True)
    out = tmp_path / "e"
    assert ev.main(["--model", str(tiny_run / "run"), "--data", str(tmp_path / "ext"), "--out", str(out),
                    "--bootstrap", "0", "--gradcam", "0", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    n = len(list((src / "images").glob("*.png")))
    _one_class_checks(m, out, "Lung_Opacity", n)

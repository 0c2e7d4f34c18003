"""Subgroup and patient-level figures (issue 22): definitions on generated predictions and metadata,
recomputed with sklearn from predictions.csv; the patient part of the training-overlap guard; bad
flags; one evaluate run end to end on a tiny trained model."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covidcxr.errors import ConfigError
from covidcxr.evaluation import cohorts
from covidcxr.evaluation import patients as PT
from covidcxr.evaluation import subgroups as S

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


def _generated(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    probs = rng.dirichlet(np.ones(4), n) * 0.5 + np.eye(4)[y] * rng.random((n, 1)) * 0.6
    probs /= probs.sum(1, keepdims=True)
    rows = pd.DataFrame({
        "path": [f"/d/{i}.png" for i in range(n)], "label": [CLASSES[i] for i in y],
        "patient_id": [f"P{i // 3}" if i % 17 else "" for i in range(n)], "study_id": "",
        "view": rng.choice(["PA", "AP", "LATERAL", "unknown"], n, p=[0.5, 0.4, 0.04, 0.06]),
        "sex": rng.choice(["F", "M", "unknown"], n, p=[0.45, 0.45, 0.1]),
        "age": [str(a) if a >= 0 else ("abc" if a == -1 else "unknown") for a in rng.integers(-2, 95, n)],
        "site": rng.choice(["A", "B"], n), "manufacturer": "unknown"})
    rows.loc[rows["view"] == "LATERAL", "label"] = "Normal"   # a subgroup of one class
    y = np.array([CLASSES.index(c) for c in rows["label"]])
    return rows, y, probs


def _recompute(pred: pd.DataFrame, idx: np.ndarray, classes=CLASSES) -> dict:
    """The subgroup figures from predictions.csv's columns, with sklearn and by hand (COVID: class 0)."""
    y = pred["true_label"].map(classes.index).to_numpy()[idx]
    p = pred[[f"prob_{c}" for c in classes]].to_numpy()[idx]
    yhat = pred["pred_label"].map(classes.index).to_numpy()[idx]
    present = np.unique(y)
    out = {"accuracy": skm.accuracy_score(y, yhat),
           "macro_f1": skm.f1_score(y, yhat, labels=present, average="macro", zero_division=0),
           "macro_auc": np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present]) if len(present) > 1 else None}
    pos = y == 0
    out["covid_sensitivity"] = ((yhat[pos] == 0).sum() / pos.sum()) if pos.any() else None
    out["covid_specificity"] = ((yhat[~pos] != 0).sum() / (~pos).sum()) if (~pos).any() else None
    return out


def _check_recomputes(sub: dict, pred: pd.DataFrame, classes=CLASSES) -> int:
    checked = 0
    for attr, a in sub["by_attribute"].items():
        col = pred["age_band"] if attr == "age" else pred[attr].replace("", "unknown")
        for g in a["groups"]:
            idx = np.flatnonzero(col.to_numpy() == g["value"])
            assert len(idx) == g["n"], (attr, g["value"])
            for k, v in _recompute(pred, idx, classes).items():
                got = g["metrics"][k]["value"]
                assert (got is None) == (v is None), (attr, g["value"], k)
                if v is not None:
                    assert abs(got - v) < 1e-9, (attr, g["value"], k, got, v)
                    checked += 1
    return checked


# ------------------------------------------------------------ flags and columns


def test_age_bands_and_subgroup_flags():
    assert S.parse_age_bands(None) == (40, 60, 80) and S.band_labels((40, 60, 80)) == ["<40", "40-59", "60-79", "80+"]
    assert S.age_band(["39.9", "40", "59.5", "60", "80", "101", "unknown", "abc", "-3", ""], (40, 60, 80)).tolist() \
        == ["<40", "40-59", "40-59", "60-79", "80+", "80+"] + ["unknown"] * 4
    assert S.band_labels(S.parse_age_bands("18,65")) == ["<18", "18-64", "65+"]
    for bad in ("60,40", "40,40", "a,b", "0,10", "40,,60", "40.5,60"):
        with pytest.raises(ConfigError, match="--age-bands"):
            S.parse_age_bands(bad)
    assert S.parse_subgroups(None) is None and S.parse_subgroups("none") == []
    assert S.parse_subgroups("view, sex,view") == ["view", "sex"]
    for bad in ("scanner", "patient_id", "view,label", ","):
        with pytest.raises(ConfigError, match="--subgroups"):
            S.parse_subgroups(bad)
    rows, _, _ = _generated(40)
    with pytest.raises(ConfigError, match="manufacturer"):
        S.check_named(["view", "manufacturer"], rows, (40, 60, 80), "split 'test'")
    with pytest.raises(ConfigError, match="site.*absent"):
        S.check_named(["site"], rows.drop(columns="site"), (40, 60, 80), "split 'test'")
    assert S.choose(None, rows, (40, 60, 80)) == ["view", "sex", "age", "site"]   # manufacturer: all unknown
    assert S.choose(None, rows[["path", "label"]], (40, 60, 80)) == []   # a manifest before metadata


def test_plan_refuses_patient_aggregation_without_ids():
    class Task:
        classifies = True

    opts = SimpleNamespace(subgroups=None, age_bands=None, aggregate="patient")
    rows, _, _ = _generated(30)
    assert cohorts.plan(opts, Task, rows, "split 'test'").aggregate == "patient"
    with pytest.raises(ConfigError, match="--aggregate patient: no image of split 'test' has a patient ID"):
        cohorts.plan(opts, Task, rows.assign(patient_id=""), "split 'test'")
    with pytest.raises(ConfigError, match="--aggregate patient"):
        cohorts.plan(opts, Task, rows.drop(columns="patient_id"), "split 'test'")


# ------------------------------------------------------------ the figures


def test_subgroup_figures_recompute_from_predictions_csv_with_sklearn(tmp_path):
    rows, y, probs = _generated()
    pred = pd.DataFrame({"path": rows["path"], "true_label": rows["label"],
                         "pred_label": [CLASSES[i] for i in probs.argmax(1)]})
    for i, c in enumerate(CLASSES):
        pred[f"prob_{c}"] = probs[:, i]
    pred["train_overlap"] = ""
    pl = cohorts.Plan(None, (40, 60, 80))
    cohorts.with_metadata(pred, rows, pl).to_csv(tmp_path / "predictions.csv", index=False, float_format="%.17g")
    back = pd.read_csv(tmp_path / "predictions.csv", dtype={"patient_id": str, "age": str}, keep_default_na=False)
    assert list(back.columns[-8:]) == ["patient_id", "study_id", "view", "sex", "age", "site", "manufacturer",
                                       "age_band"]
    s = S.Scored(y, CLASSES, y, probs)
    sub = S.subgroups(s, rows, S.choose(None, rows, pl.edges), pl.edges, 200, 0)
    assert sub["metrics"] == list(S.CLASS_METRICS) and sub["covid_class"] == "COVID"
    assert _check_recomputes(sub, back) > 60
    for k, v in _recompute(back, np.arange(len(back))).items():
        assert abs(sub["overall"]["metrics"][k]["value"] - v) < 1e-9
    view = {g["value"]: g for g in sub["by_attribute"]["view"]["groups"]}
    assert list(view) == ["AP", "LATERAL", "PA", "unknown"]       # known sorted, unknown last
    lat = view["LATERAL"]
    assert lat["small"] and lat["classes"] == {"Normal": lat["n"]}
    assert lat["metrics"]["macro_auc"]["value"] is None and "one class only" in lat["metrics"]["macro_auc"]["reason"]
    assert lat["metrics"]["covid_sensitivity"]["reason"] == "no COVID images in this subgroup"
    assert lat["metrics"]["covid_specificity"]["value"] == 1.0 or lat["metrics"]["covid_specificity"]["value"] < 1
    assert not view["PA"]["small"] and view["PA"]["n"] >= 30
    # intervals bracket the point figures; the gap is between two known subgroups, with a joint interval
    for g in view.values():
        for k, e in g["metrics"].items():
            if e["value"] is not None and e["ci95"]:
                assert e["ci95"]["low"] - 1e-12 <= e["value"] <= e["ci95"]["high"] + 1e-12, (g["value"], k)
    gap = sub["by_attribute"]["view"]["gaps"]["macro_auc"]
    aucs = {v: g["metrics"]["macro_auc"]["value"] for v, g in view.items() if v not in ("unknown", "LATERAL")}
    assert gap["value"] == pytest.approx(max(aucs.values()) - min(aucs.values()))
    assert {gap["high_group"], gap["low_group"]} <= set(aucs) and gap["ci95"]["n"] == 200
    assert gap["ci95"]["low"] < gap["value"] < gap["ci95"]["high"] + 1e-12
    acc_gap = sub["by_attribute"]["view"]["gaps"]["accuracy"]
    assert acc_gap["involves_small"] == ("LATERAL" in (acc_gap["high_group"], acc_gap["low_group"]))
    # seeded: the same figures again
    assert S.subgroups(s, rows, ["view"], pl.edges, 200, 0)["by_attribute"]["view"] == sub["by_attribute"]["view"]
    json.dumps(sub)   # plain JSON


def test_no_bootstrap_no_covid_class_and_dice(tmp_path, saved_figures):
    from covidcxr.evaluation.forest import plot_forest

    rows, y, probs = _generated(120, seed=1)
    names = ["Pneumonia", "Lung_Opacity", "Normal", "Other"]
    sub = S.subgroups(S.Scored(y, names, y, probs), rows, ["sex"], (40, 60, 80), 0, 0)
    assert sub["metrics"] == ["accuracy", "macro_f1", "macro_auc"] and sub["covid_class"] is None
    g = sub["by_attribute"]["sex"]["groups"][0]
    assert g["metrics"]["accuracy"]["ci95"] is None and sub["by_attribute"]["sex"]["gaps"]["accuracy"]["ci95"] is None
    # a segmenter: Dice per subgroup (NaN: no readable mask), strata are the images' labels
    dice = np.random.default_rng(2).random(120)
    dice[:5] = np.nan
    seg = S.subgroups(S.Scored(rows["label"].to_numpy(), [], dice=dice), rows, ["site"], (40, 60, 80), 100, 0)
    assert seg["metrics"] == ["dice"]
    for g in seg["by_attribute"]["site"]["groups"]:
        d = dice[(rows["site"] == g["value"]).to_numpy()]
        assert g["metrics"]["dice"]["value"] == pytest.approx(np.nanmean(d), abs=1e-12)
        e = g["metrics"]["dice"]
        assert e["ci95"]["low"] <= e["value"] <= e["ci95"]["high"]
    assert plot_forest(seg, tmp_path / "seg.png") and (tmp_path / "seg.png").stat().st_size > 2000
    full = S.subgroups(S.Scored(y, CLASSES, y, probs), rows, ["view", "sex", "age"], (40, 60, 80), 50, 0)
    assert plot_forest(full, tmp_path / "subgroups.png", "test split, n=120")
    ax = saved_figures[-1].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "view" in labels and any("LATERAL" in t and "small" in t for t in labels)
    assert any("overall" in t.get_text() for t in ax.get_legend().get_texts())
    assert any(t.get_text().startswith("n/a: one class only") for t in ax.texts)


# ------------------------------------------------------------ patients


def test_patient_aggregation_leaves_out_mixed_label_patients(tmp_path):
    ids = np.array(["a", "a", "b", "b", "b", "", "c", "c", "d"], object)
    y = np.array([0, 0, 1, 1, 1, 0, 0, 2, 2])
    probs = np.random.default_rng(0).dirichlet(np.ones(3), len(ids))
    pt = PT.aggregate(ids, y, probs)
    assert pt.ids.tolist() == ["a", "b", "c", "d"] and pt.films.tolist() == [2, 3, 2, 1] and pt.no_id == 1
    assert pt.mixed.tolist() == [False, False, True, False] and pt.y[:2].tolist() == [0, 1]
    np.testing.assert_allclose(pt.probs[1], probs[2:5].mean(0), atol=1e-15)
    info, warn = PT.patient_level(ids, y, probs, ["COVID", "Normal", "Other"], 20, 0, tmp_path)
    assert (info["n_patients"], info["n_images"], info["mixed_label_patients"], info["mixed_label_images"],
            info["images_without_patient_id"]) == (3, 6, 1, 2, 1)
    assert any("different true labels" in w and "c" in w for w in warn) and any("no patient ID" in w for w in warn)
    table = pd.read_csv(tmp_path / "patient_predictions.csv", keep_default_na=False)
    assert table["mixed_labels"].tolist() == [False, False, True, False]
    f = info["figures"]
    assert f["n"] == 3 and f["accuracy"] == skm.accuracy_score(pt.y[~pt.mixed], pt.probs[~pt.mixed].argmax(1))


def test_patient_overlap_guard(tmp_path):
    man = pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "label": "Normal",
                        "split": ["train", "train", "train", "val", "test", "test"],
                        "patient_id": ["p1", "p1", "p2", "p3", "p4", ""]})
    man.to_csv(tmp_path / "manifest.csv", index=False)
    rows = pd.DataFrame({"path": ["x", "y", "z", "w"], "patient_id": ["p1", "p4", "", "p2"]})
    g = PT.guard(tmp_path / "manifest.csv", rows, False, tmp_path)
    assert g.hit.tolist() == [True, False, False, True] and g.dropped.tolist() == g.hit.tolist()
    assert g.info["matched"] == 2 and g.info["patients"] == 2 and g.info["excluded"] == 2
    assert "2 of 4 images are of 2 patient(s) whose films trained this model" in g.info["summary"]
    table = pd.read_csv(tmp_path / "patient_overlap.csv")
    assert table.to_dict("list") == {"path": ["x", "w"], "patient_id": ["p1", "p2"],
                                     "training_images_of_patient": [2, 1]}
    kept = PT.guard(tmp_path / "manifest.csv", rows, True, tmp_path)
    assert not kept.dropped.any() and kept.info["included"] and "INCLUDED" in kept.info["summary"]
    assert PT.flags(np.array(["train:near", "", "", ""], object), g.hit).tolist() == \
        ["train:near+train:patient", "", "", "train:patient"]
    no_ids = PT.guard(tmp_path / "manifest.csv", rows.drop(columns="patient_id"), False, tmp_path)
    assert not no_ids.info["checked"] and "evaluated images have no patient IDs" in no_ids.info["reason"]
    man.drop(columns="patient_id").to_csv(tmp_path / "old.csv", index=False)
    old = PT.guard(tmp_path / "old.csv", rows, False, tmp_path)
    assert not old.info["checked"] and "no patient IDs in its train split" in old.info["reason"]
    assert PT.guard(None, rows, False, tmp_path).info["reason"] == "no run manifest beside the model"


# ------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_run(synth_dir, tmp_path_factory):
    from covidcxr import train

    root = tmp_path_factory.mktemp("subrun")
    assert train.main(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                       "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8",
                       "--run-dir", str(root / "run"), "--export-dir", str(root / "export")]) == 0
    return root / "run"


def _with_metadata(src, run):
    """A copy of run ``src`` whose manifest has metadata: every image its own patient but one test image of
    a training patient and two test images of one patient with different labels; views, sexes, ages."""
    shutil.copytree(src, run)
    man = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    n = len(man)
    man["patient_id"] = [f"P{i}" for i in range(n)]
    man["study_id"] = ""
    man["view"] = np.where(np.arange(n) % 3 == 0, "AP", "PA")
    man["sex"] = np.where(np.arange(n) % 2 == 0, "F", "M")
    man["age"] = [str(20 + (i * 7) % 70) if i % 5 else "unknown" for i in range(n)]
    man["site"] = "unknown"
    man["manufacturer"] = "unknown"
    test = man.index[man["split"] == "test"]
    train0 = man.index[man["split"] == "train"][0]
    man.loc[test[0], "patient_id"] = man.loc[train0, "patient_id"]          # patient overlap
    other = [i for i in test[1:] if man.loc[i, "label"] != man.loc[test[1], "label"]][0]
    man.loc[other, "patient_id"] = man.loc[test[1], "patient_id"]           # one patient, two labels
    man.to_csv(run / "manifest.csv", index=False)
    return man, man.loc[test[0], "path"]


def test_evaluate_end_to_end_subgroups_patients_and_bad_flags(tiny_run, tmp_path, capsys):
    from covidcxr import evaluate as ev

    run = tmp_path / "run"
    man, overlapping = _with_metadata(tiny_run, run)
    out = tmp_path / "ev"
    assert ev.main(["--model", str(run), "--out", str(out), "--bootstrap", "40", "--gradcam", "0", "--quiet",
                    "--aggregate", "patient", "--age-bands", "30,50"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    n_test = int((man["split"] == "test").sum())
    po = m["patient_overlap"]
    assert (po["checked"], po["matched"], po["excluded"], po["patients"]) == (True, 1, 1, 1) and m["n"] == n_test - 1
    assert "1 of " in said and "whose films trained this model" in said
    assert pd.read_csv(out / "patient_overlap.csv")["path"].tolist() == [overlapping]
    pred = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    assert overlapping not in pred["path"].tolist()
    assert list(pred.columns[-8:]) == ["patient_id", "study_id", "view", "sex", "age", "site", "manufacturer",
                                       "age_band"]
    sub = m["subgroups"]
    assert sub["attributes"] == ["view", "sex", "age"] and sub["age_bands"]["labels"] == ["<30", "30-49", "50+"]
    assert all(g["small"] for a in sub["by_attribute"].values() for g in a["groups"])
    assert "unknown" in [g["value"] for g in sub["by_attribute"]["age"]["groups"]]
    for c in m["classes"][1:]:
        pred[f"prob_{c}"] = pred[f"prob_{c}"].astype(float)
    pred[f"prob_{m['classes'][0]}"] = pred[f"prob_{m['classes'][0]}"].astype(float)
    assert m["classes"][0].startswith("COVID")
    assert _check_recomputes(sub, pred, m["classes"]) >= 6
    pl = m["patient_level"]
    assert pl["mixed_label_patients"] == 1 and pl["n_patients"] == m["n"] - 2 and pl["figures"]
    assert (out / "subgroups.png").stat().st_size > 2000 and (out / "patient_predictions.csv").exists()
    html = (out / "report.html").read_text()
    assert "<h2>Subgroups</h2>" in html and "By view" in html and "largest gap" in html and "(small)" in html
    assert "<h2>Patient level</h2>" in html and "whose films trained this model" in html
    assert any("different true labels" in w for w in m["warnings"])
    # bad flags: one line, exit 2, nothing written
    cases = [(["--subgroups", "site"], "no image of split 'test' has a known site"),
             (["--subgroups", "scanner"], "not a subgroup attribute"),
             (["--age-bands", "60,40"], "--age-bands"),
             (["--model", str(tiny_run), "--aggregate", "patient"], "has a patient ID")]
    for args, msg in cases:
        bad = tmp_path / "bad"
        assert ev.main(["--model", str(run), "--out", str(bad), "--bootstrap", "0", "--quiet", *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (args, err)
        assert not bad.exists() and not (tmp_path / "bad.partial").exists()

"""MODEL_CARD.md (run, export, evaluation) and the site shortcut probe: the card's front matter is YAML
with the Hugging Face keys, its counts are the manifest's, evaluation figures (subgroups, operating
point) render, an evaluation writes its card without touching the model folder, and the site probe
warns on a predictable, confounded site and not on a random one."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from covidcxr import modelcard
from covidcxr.evaluation import siteprobe
from covidcxr.modelcard import facts as F
from covidcxr.modelcard.mdhtml import to_html
from covidcxr.tasks import get_task

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
TASK = get_task("classify")


def _run_folder(root: Path, n_per: int = 12) -> Path:
    """A run folder's files as training writes them (no model needed for the card)."""
    rng = np.random.default_rng(0)
    rows = []
    for c in CLASSES:
        for i in range(n_per):
            rows.append({"path": f"/data/{c}/{i}.png", "label": c, "lung_mask": "", "infection_mask": "",
                         "split": ["train", "train", "train", "val", "test", "unused"][i % 6], "sha256": "x",
                         "group": len(rows) // 2, "patient_id": f"p{len(rows) // 3}",
                         "site": rng.choice(["A", "B"]), "sex": rng.choice(["F", "M"]),
                         "age": str(int(rng.integers(20, 90)))})
    root.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "config.json").write_text(json.dumps({"task": "classify", "arch": "resnet50", "data": "/data/kaggle",
                                                  "split": "0.7,0.15,0.15", "seed": 7, "weights": "imagenet",
                                                  "lr": 5e-4, "class_weights": True, "label_fraction": 1.0}))
    (root / "model_card.json").write_text(json.dumps({"classes": CLASSES, "arch": "resnet50", "task": "classify",
                                                      "image_size": 224, "normalization": "unit",
                                                      "contrast": "clahe", "lung_crop": "", "backend": "jax"}))
    (root / "history.csv").write_text("epoch,loss\n0,1.0\n1,0.5\n")
    (root / "metrics.json").write_text(json.dumps({"best_epoch": {"epoch": 1, "value": 0.61},
                                                   "test": {"n": 6, "accuracy": 0.5, "macro_f1": 0.4,
                                                            "macro_auc": 0.7}}))
    pd.DataFrame([("/data/x.png", "/data/x.png: cannot identify image file; left out")],
                 columns=["path", "reason"]).to_csv(root / "skipped.csv", index=False)
    return root


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def test_front_matter_is_yaml_with_the_hugging_face_keys(tmp_path):
    run = _run_folder(tmp_path / "run")
    text = modelcard.write_run(run, TASK).read_text()
    doc = _front(text)
    assert doc["library_name"] == "keras" and doc["license"] == "other"
    assert {"chest-x-ray", "covid-19", "classify", "resnet50"} <= set(doc["tags"])
    assert doc["datasets"] == ["kaggle"] and {"accuracy", "roc_auc"} <= set(doc["metrics"])
    assert "research use only; not a medical device" in text
    for section in ("## Intended use", "## Training data", "## Preprocessing", "## Results", "## Probes",
                    "## Known limitations", "## Reporting checklist"):
        assert section in text, section
    assert "clahe" in text and "seed 7" in text and "(patients" not in text.split("## Training data")[0]


def test_the_cards_counts_are_the_manifests(tmp_path):
    run = _run_folder(tmp_path / "run")
    text = modelcard.write_run(run, TASK).read_text()
    man = pd.read_csv(run / "manifest.csv")
    t = pd.crosstab(man["label"], man["split"])
    header = next(ln for ln in text.splitlines() if ln.startswith("| class | train"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for c in CLASSES:
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {c} |"))
        cells = [x.strip() for x in row.strip("|").split("|")]
        for split in ("train", "val", "test", "unused"):
            assert int(cells[cols.index(split)]) == t.loc[c, split], (c, split)
        assert int(cells[cols.index("all")]) == (man["label"] == c).sum()
    facts = F.gather(run)
    patients = man["patient_id"].nunique()
    assert facts["data"]["split"]["patients"] == patients and f"{patients} patients" in text
    assert "Left out: 1 files" in text and "cannot identify image file" in text
    chars = next(ln for ln in text.splitlines() if ln.startswith("Characteristics"))
    assert f"A {int((man['site'] == 'A').sum())}" in chars.split("site: ")[1].split(";")[0]


def test_subgroups_and_operating_point_render_and_missing_keys_read_not_reported(tmp_path):
    run = _run_folder(tmp_path / "run")
    ci = {"low": 0.61, "high": 0.83, "n": 200}
    m = {"split": "test", "n": 40, "external": False, "classes": CLASSES, "accuracy": 0.75,
         "macro_f1": 0.7, "macro_auc": 0.8, "ci95": {"accuracy": ci}, "warnings": [],
         "bootstrap": {"replicates": 200, "seed": 0},
         "subgroups": {"attributes": ["sex"], "min_n": 30, "metrics": ["accuracy", "macro_auc"], "bootstrap": 200,
                       "by_attribute": {"sex": {
                           "groups": [{"value": "F", "n": 25, "small": True,
                                       "metrics": {"accuracy": {"value": 0.8, "ci95": None, "reason": None},
                                                   "macro_auc": {"value": 0.812, "ci95": ci, "reason": None}}},
                                      {"value": "M", "n": 15, "small": True,
                                       "metrics": {"accuracy": {"value": 0.6, "ci95": None, "reason": None},
                                                   "macro_auc": {"value": 0.7, "ci95": {"low": 0.5, "high": 0.9,
                                                                                       "n": 200}}}}],
                           "gaps": {"macro_auc": {"value": 0.112, "high_group": "F", "low_group": "M",
                                                  "ci95": {"low": 0.01, "high": 0.3, "n": 200},
                                                  "involves_small": True, "reason": None}}}}},
         "operating_point": {"class": "COVID", "threshold": 0.314, "rule": "sensitivity=0.95", "chosen_on": "val",
                             "sensitivity": {"value": 0.951, "low": 0.9, "high": 0.99, "n": 200},
                             "specificity": 0.62, "ci95": {"specificity": ci}, "confusion": [[10, 2], [1, 27]]}}
    out = tmp_path / "ev"
    out.mkdir()
    text = modelcard.write_evaluation(run, out, m, TASK).read_text()
    assert "| F | 25 | yes | 0.800 | 0.812 [0.610, 0.830] |" in text and "0.700 [0.500, 0.900]" in text
    assert "macro_auc: F - M = 0.112 [0.010, 0.300] (involves a small subgroup)" in text
    assert "threshold 0.314" in text and "0.951 [0.900, 0.990]" in text and "0.620 [0.610, 0.830]" in text
    assert "chosen_on val" in text and "[[10, 2], [1, 27]]" in text
    after = text.split("**Patient level**")[1]
    assert after.lstrip().startswith("not reported")   # no patient_level key
    assert "small sex subgroups" in text
    assert "[Results](#results)" in text.split("Fairness")[1].splitlines()[0]
    html = to_html(text)
    assert '<h3 id="results">Results</h3>' in html and "<table>" in html and "<script" not in html


def test_an_evaluation_writes_its_card_and_leaves_the_model_folder_alone(tiny_eval):
    run, out, before, after = tiny_eval
    assert before == after
    text = (out / modelcard.MODEL_CARD).read_text()
    assert "### Evaluation 1 (internal)" in text and "![roc.png](roc.png)" in text
    assert _front(text)["library_name"] == "keras"
    assert (run / modelcard.MODEL_CARD).exists()   # training wrote the run's own
    assert "Model card (MODEL_CARD.md)" in (out / "report.html").read_text()


# ------------------------------------------------------------------ the site probe


def test_site_probe_warns_on_a_predictable_confounded_site():
    rng = np.random.default_rng(1)
    site = np.repeat(["A", "B"], 60)
    label = np.where(site == "A", 0, 1)
    label[::10] = 1 - label[::10]                       # mostly, not perfectly, confounded
    feats = rng.normal(size=(120, 16))
    feats[:, 0] += np.where(site == "A", 4.0, -4.0)     # the site is written into the features
    r = siteprobe.assess(feats, site, label, seed=0, replicates=200)
    assert r["ran"] and r["auc_ci95"]["low"] > 0.7 and r["cramers_v"]["v"] >= 0.1
    assert r["warning"] and r["verdict"].startswith("WARNING") and r["folds"] == 5
    again = siteprobe.assess(feats, site, label, seed=0, replicates=200)
    assert again["auc"] == r["auc"] and again["auc_ci95"] == r["auc_ci95"]   # seeded


def test_site_probe_is_quiet_on_a_random_site_and_skips_one_site():
    rng = np.random.default_rng(2)
    site = rng.choice(["A", "B", "C"], 150)
    label = rng.integers(0, 2, 150)
    r = siteprobe.assess(rng.normal(size=(150, 8)), site, label, seed=0)
    assert r["ran"] and r["auc_kind"] == "macro one-vs-rest" and r["warning"] is None
    assert r["auc_ci95"]["low"] < 0.7
    one = siteprobe.assess(rng.normal(size=(10, 4)), ["A"] * 9 + ["unknown"], [0, 1] * 5)
    assert not one["ran"] and "fewer than 2" in one["reason"] and one["left_out"]["unknown_site"] == 1


def test_cramers_v_matches_the_definition():
    from scipy.stats import chi2_contingency

    a = np.array(list("AAAABBBBBB"))
    b = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 1])
    chi2 = chi2_contingency(pd.crosstab(a, b).to_numpy(), correction=False)[0]
    assert siteprobe.cramers_v(a, b)["v"] == pytest.approx(np.sqrt(chi2 / 10))
    assert siteprobe.cramers_v(a, np.zeros(10))["v"] == 0.0


def test_penultimate_features_are_the_input_of_the_classifier_dense():
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3)(inp))
    x = keras.layers.Dense(4, name="penult")(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="label")(x))
    fm = siteprobe.feature_model(model)
    xb = np.random.default_rng(0).random((2, 8, 8, 1)).astype("float32")
    want = keras.Model(inp, model.get_layer("penult").output).predict_on_batch(xb)
    np.testing.assert_allclose(fm.predict_on_batch(xb), want, rtol=1e-6)


# ------------------------------------------------------------------ end to end (one tiny run)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_eval(synth_dir, tmp_path_factory):
    from covidcxr import evaluate, train

    root = tmp_path_factory.mktemp("cardrun")
    run = root / "run"
    assert train.main(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                       "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8", "--run-dir", str(run),
                       "--export-dir", "none"]) == 0
    # a first evaluation saves calibration.json beside the model (documented); the second changes nothing there
    assert evaluate.main(["--model", str(run), "--out", str(root / "ev0"), "--bootstrap", "20", "--gradcam", "0",
                          "--quiet"]) == 0
    before = _digest(run)
    out = root / "ev"
    assert evaluate.main(["--model", str(run), "--out", str(out), "--bootstrap", "20", "--gradcam", "0",
                          "--quiet"]) == 0
    return run, out, before, _digest(run)


def test_site_probe_skips_without_a_site_column_and_for_a_bare_savedmodel():
    class SavedModelOnly:
        kind = "savedmodel"

    rows = pd.DataFrame({"path": ["a", "b", "c", "d"], "label": ["COVID", "Normal"] * 2})
    assert siteprobe.probe(SavedModelOnly(), rows, [0, 1, 0, 1], 0, 0, True) is None
    rows["site"] = ["A", "A", "B", "B"]
    r = siteprobe.probe(SavedModelOnly(), rows, [0, 1, 0, 1], 0, 0, True)
    assert not r["ran"] and "SavedModel" in r["reason"]

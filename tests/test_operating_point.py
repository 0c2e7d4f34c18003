"""Operating points (issue 22, part 4): SPEC parsing, the choosing rules against sklearn's roc_curve,
the refusal to choose on the scored split, and evaluate / predict / export end to end on a tiny run:
the test sensitivity recomputes exactly from predictions.csv at the saved threshold."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from covidcxr import artifacts as A
from covidcxr import operating as OP
from covidcxr.errors import ConfigError
from covidcxr.evaluation import operating_point as OPE

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


# ------------------------------------------------------------------ SPECs

@pytest.mark.parametrize("text, want", [
    (None, ("COVID", "sensitivity", 0.95)), ("", ("COVID", "sensitivity", 0.95)),
    ("youden", ("COVID", "youden", None)), ("Normal:youden", ("Normal", "youden", None)),
    ("COVID:specificity=0.9", ("COVID", "specificity", 0.9)), ("sensitivity=1", ("COVID", "sensitivity", 1.0)),
    ("Viral Pneumonia:threshold=0.3", ("Viral Pneumonia", "threshold", 0.3)), ("COVID:threshold=0", ("COVID", "threshold", 0.0)),
    (" COVID : Sensitivity = 0.8 ", ("COVID", "sensitivity", 0.8))])
def test_good_specs(text, want):
    s = OP.parse_spec(text, CLASSES)
    assert (s.cls, s.rule, s.value) == want and s.chosen == (want[1] != "threshold")


@pytest.mark.parametrize("text, msg", [
    ("COVID:sensitivity=1.5", "above 0 and at most 1"), ("COVID:sensitivity=0", "above 0"),
    ("COVID:specificity=-0.1", "above 0"), ("COVID:threshold=1.2", "between 0 and 1"),
    ("COVID:sensitivity=abc", "not a number"), ("COVID:sensitivity=nan", "above 0"),
    ("Cat:youden", "no class 'Cat'"), ("COVID-19:sensitivity=0.95", "no class 'COVID-19'"),
    ("COVID:precision=0.9", "not a rule"), ("COVID:youden=1", "not a rule"), ("COVID:sensitivity", "not a rule")])
def test_bad_specs_are_one_clear_line(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        OP.parse_spec(text, CLASSES)
    assert "\n" not in str(e.value) and text.split(":")[0] in str(e.value)


def test_no_covid_class_and_no_class_named():
    with pytest.raises(ConfigError, match="no COVID class"):
        OP.parse_spec("", ["Normal", "Pneumonia"])
    assert OP.parse_spec("Pneumonia:youden", ["Normal", "Pneumonia"]).cls == "Pneumonia"
    assert OP.parse_spec("", ["Non-COVID", "COVID-19"]).cls == "COVID-19"


# ------------------------------------------------------------------ rules against sklearn

def _cases(n_cases=200, seed=0):
    rng = np.random.default_rng(seed)
    while n_cases:
        n = int(rng.integers(4, 80))
        pos = rng.random(n) < 0.35
        if pos.all() or not pos.any():
            continue
        n_cases -= 1
        yield pos, np.round(rng.random(n) * (0.6 + 0.8 * pos), int(rng.integers(1, 4)))  # ties at 1-3 decimals


@pytest.mark.parametrize("v", [0.5, 0.8, 0.95, 1.0])
def test_sensitivity_and_specificity_rules_match_roc_curve(v):
    for pos, score in _cases():
        fpr, tpr, thr = roc_curve(pos, score, drop_intermediate=False)
        t = OP.choose(OP.Spec("c", "sensitivity", v), pos, score)
        assert t == thr[tpr >= v].max()                       # the highest threshold with sensitivity >= v
        assert OP.at(pos, score, t)["sensitivity"] >= v
        t = OP.choose(OP.Spec("c", "specificity", v), pos, score)
        low = thr[1 - fpr >= v].min()                          # the lowest threshold with specificity >= v
        if np.isfinite(low):
            assert t == low
        else:                                                  # only sklearn's inf: flag nothing
            assert t > score.max() and not (score >= t).any()
        assert OP.at(pos, score, t)["specificity"] >= v


def test_youden_matches_roc_curve_ties_to_the_highest_threshold():
    for pos, score in _cases(seed=1):
        fpr, tpr, thr = roc_curve(pos, score, drop_intermediate=False)
        t = OP.choose(OP.Spec("c", "youden", None), pos, score)
        j = tpr - fpr
        assert np.isclose(OP.at(pos, score, t)["sensitivity"] + OP.at(pos, score, t)["specificity"] - 1, j.max())
        best = thr[np.flatnonzero(np.isclose(j, j.max()))].max()
        assert t == best or (not np.isfinite(best) and t > score.max())


def test_fixed_threshold_figures_and_matrix():
    pos = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    score = np.array([0.9, 0.3, 0.2, 0.3, 0.1, 0.05, 0.7])
    assert OP.choose(OP.Spec("c", "threshold", 0.3), pos, score) == 0.3
    f = OP.at(pos, score, 0.3)                     # p >= 0.3 flags 0.9, 0.3 (pos) and 0.3, 0.7 (neg)
    assert f["confusion"] == {"tp": 2, "fn": 1, "fp": 2, "tn": 2} and f["matrix"] == [[2, 1], [2, 2]]
    assert (f["sensitivity"], f["specificity"], f["ppv"], f["npv"]) == (2 / 3, 0.5, 0.5, 2 / 3)
    assert OP.at(pos, score, 0.95)["ppv"] is None  # nothing flagged
    with pytest.raises(ConfigError, match="choosing needs both"):
        OP.choose(OP.Spec("c", "youden", None), np.ones(3, bool), np.ones(3))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    score = np.clip(rng.normal(0.3 + 0.3 * (y == 0), 0.2), 0, 1)
    a, b = (OP.bootstrap(y, y == 0, score, 0.5, 300, seed=7) for _ in range(2))
    assert a == b and OP.bootstrap(y, y == 0, score, 0.5, 0, 7) is None
    f = OP.at(y == 0, score, 0.5)
    for k in OP.FIGURES:
        assert a[k]["low"] <= f[k] <= a[k]["high"] and a[k]["n"] == 300
    assert a["sensitivity"]["low"] < a["sensitivity"]["high"]


def test_choosing_on_the_scored_split_is_refused():
    val = pd.DataFrame({"path": ["/d/a.png", "/d/b.png"], "label": ["COVID", "Normal"]})
    test = pd.DataFrame({"path": ["/d/c.png"], "label": ["COVID"]})
    chosen, fixed = OP.parse_spec("", CLASSES), OP.parse_spec("COVID:threshold=0.4", CLASSES)
    OPE.check_split(chosen, val, "validation split of the data", test, "test")
    with pytest.raises(ConfigError, match="choosing on the split being scored is refused"):
        OPE.check_split(chosen, val, "validation split of the data", val, "val")
    OPE.check_split(fixed, val, "validation split of the data", val, "val")  # a fixed threshold: any split
    with pytest.raises(ConfigError, match="nothing to choose"):
        OPE.check_split(chosen, None, "no validation split in the data or the run", test, "all")


def test_operating_point_file_round_trip(tmp_path):
    op = {"class": "COVID", "rule": "youden", "spec": "COVID:youden", "threshold": 0.42, "validation": {"n": 3}}
    OP.save(tmp_path / A.OPERATING_POINT, op)
    assert OP.load(tmp_path / A.OPERATING_POINT, CLASSES) == ("COVID", 0.42)
    with pytest.raises(ConfigError, match="not a class of this model"):
        OP.load(tmp_path / A.OPERATING_POINT, ["Normal", "Pneumonia"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not an operating_point.json"):
        OP.load(tmp_path / "bad.json", CLASSES)


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny_run(synth_dir, tmp_path_factory) -> Path:
    from covidcxr import train

    root = tmp_path_factory.mktemp("oprun")
    rc = train.main(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                     "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8",
                     "--run-dir", str(root / "run"), "--export-dir", "none"])
    assert rc == 0
    return root / "run"


def evaluate(*argv) -> int:
    from covidcxr import evaluate as ev

    return ev.main([str(a) for a in argv])


def predict(*argv) -> int:
    from covidcxr import predict as P

    return P.main([str(a) for a in argv])


def test_evaluate_operating_point_end_to_end(tiny_run, tmp_path, capsys, saved_figures):
    run, out = tiny_run, tmp_path / "ev"
    assert evaluate("--model", run, "--out", out, "--bootstrap", "50", "--gradcam", "0", "--operating-point") == 0
    said = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    op, saved = m["operating_point"], json.loads((out / A.OPERATING_POINT).read_text())
    assert json.loads((run / A.OPERATING_POINT).read_text()) == saved   # beside the model too
    assert op["class"] == saved["class"] == "COVID" and op["spec"] == "COVID:sensitivity=0.95"
    assert op["threshold"] == saved["threshold"] and "validation split of the" in op["chosen_on"]
    assert op["validation"]["sensitivity"] >= 0.95 and saved["validation"] == op["validation"]
    man = pd.read_csv(run / "manifest.csv")
    assert op["validation"]["n"] == int((man["split"] == "val").sum())
    # The target: the test figures recompute exactly from predictions.csv at the saved threshold.
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False, float_precision="round_trip")
    pos, hit = (pred["true_label"] == "COVID").to_numpy(), (pred["prob_COVID"] >= saved["threshold"]).to_numpy()
    tp, fn, fp, tn = (int(np.sum(a & b)) for a, b in ((hit, pos), (~hit, pos), (hit, ~pos), (~hit, ~pos)))
    assert op["confusion"] == {"tp": tp, "fn": fn, "fp": fp, "tn": tn} and op["n"] == len(pred)
    assert op["sensitivity"] == tp / (tp + fn) and op["specificity"] == tn / (tn + fp)
    assert op["ppv"] == (tp / (tp + fp) if tp + fp else None) and op["npv"] == (tn / (tn + fn) if tn + fn else None)
    assert all(op["ci95"][k] is None or set(op["ci95"][k]) == {"low", "high", "n"} for k in OP.FIGURES)
    assert "operating point COVID:sensitivity=0.95: threshold" in said and "saved to" in said
    assert "Operating point: COVID" in (out / "report.html").read_text()
    labels = [ln.get_label() for f in saved_figures for ax in f.axes for ln in ax.get_lines()]   # roc.png's point
    assert any(lb.startswith("operating point COVID:sensitivity=0.95") for lb in labels)
    # A second operating point: written into its folder, the model's file kept without --overwrite.
    assert evaluate("--model", run, "--out", tmp_path / "y", "--bootstrap", "0", "--gradcam", "0",
                    "--operating-point", "youden") == 0
    assert "exists; kept it" in capsys.readouterr().out
    assert json.loads((run / A.OPERATING_POINT).read_text()) == saved
    assert json.loads((tmp_path / "y" / A.OPERATING_POINT).read_text())["rule"] == "youden"


def test_evaluate_operating_point_refusals(tiny_run, tmp_path, capsys):
    cases = [(["--split", "val", "--operating-point"], "choosing on the split being scored is refused"),
             (["--operating-point", "COVID:sensitivity=1.5"], "above 0 and at most 1"),
             (["--operating-point", "Cat:youden"], "no class 'Cat'")]
    for args, msg in cases:
        out = tmp_path / "out"
        assert evaluate("--model", tiny_run, "--out", out, "--bootstrap", "0", *args) == 2, args
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    # A fixed threshold chooses nothing: allowed on the validation split.
    assert evaluate("--model", tiny_run, "--out", tmp_path / "v", "--bootstrap", "0", "--gradcam", "0", "--split",
                    "val", "--operating-point", "COVID:threshold=0.3") == 0
    op = json.loads((tmp_path / "v" / "metrics.json").read_text())["operating_point"]
    assert op["threshold"] == 0.3 and op["chosen_on"] is None


def test_predict_flags_and_export_carry_the_operating_point(tiny_run, tmp_path, capsys):
    man = pd.read_csv(tiny_run / "manifest.csv")
    files = man[man["split"] == "test"]["path"].tolist()
    if not (tiny_run / A.OPERATING_POINT).exists():
        OP.save(tiny_run / A.OPERATING_POINT, {"class": "COVID", "threshold": 0.25, "rule": "threshold"})
    t = json.loads((tiny_run / A.OPERATING_POINT).read_text())["threshold"]
    assert predict("--model", tiny_run, *files, "--out", tmp_path / "p.csv", "--quiet", "--operating-point") == 0
    p = pd.read_csv(tmp_path / "p.csv", float_precision="round_trip")
    assert list(p.columns)[-1] == "flag_COVID" and set(p["flag_COVID"]) <= {0, 1}
    assert (p["flag_COVID"] == (p["prob_COVID"] >= t).astype(int)).all()
    assert json.loads((tmp_path / "p.csv.meta.json").read_text())["operating_point"]["threshold"] == t
    # --calibrated rescales prob_ columns; the flag stays on the uncalibrated probability.
    (tiny_run / A.CALIBRATION).exists() or (tiny_run / A.CALIBRATION).write_text(json.dumps({"temperature": 2.0}))
    assert predict("--model", tiny_run, *files, "--out", tmp_path / "c.parquet", "--quiet", "--calibrated",
                   "--operating-point", tiny_run / A.OPERATING_POINT) == 0
    c = pd.read_parquet(tmp_path / "c.parquet").sort_values("path").reset_index(drop=True)
    assert str(c["flag_COVID"].dtype) == "int64"
    assert c["flag_COVID"].tolist() == p.sort_values("path")["flag_COVID"].tolist()
    assert predict("--model", tiny_run, *files[:2], "--out", tmp_path / "f.csv", "--quiet",
                   "--operating-point", "COVID:threshold=0") == 0
    assert (pd.read_csv(tmp_path / "f.csv")["flag_COVID"] == 1).all()
    (tmp_path / "cat.json").write_text(json.dumps({"class": "Cat", "threshold": 0.5}))
    capsys.readouterr()
    for arg, msg in ((tmp_path / "cat.json", "'Cat' is not a class of this model"),
                     ("COVID:sensitivity=1.5", "above 0 and at most 1"), ("Cat:threshold=0.2", "no class 'Cat'"),
                     ("COVID:sensitivity=0.9", "no labels to choose"), (files[0], "not a .json file")):
        assert predict("--model", tiny_run, *files[:1], "--out", tmp_path / "x.csv", "--operating-point", arg) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    from covidcxr.exporting import export_run

    if export_run(tiny_run, tmp_path / "export", checks=files[:1], log=lambda *a: None) is not None:
        assert (tmp_path / "export" / A.OPERATING_POINT).read_text() == (tiny_run / A.OPERATING_POINT).read_text()
        assert "operating_point.json" in (tmp_path / "export" / "README.md").read_text()

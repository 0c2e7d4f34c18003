"""What the evaluation reports say, on hand-made figures and a stand-in segmenter (no training):
the lungs-out verdict against chance and the majority class, the majority-class baseline, the
segmentation intervals, resolutions and worst cases, label maps for one-class sets, and the
reliability diagram's sparse bins."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covidcxr.evaluation import figures as F

CLASSES = ["COVID-19", "Non-COVID", "Normal"]


# ------------------------------------------------------------ the lungs-out probe's verdict


def _fig(acc, auc, auc_ci=None, acc_ci=None, majority=None):
    ci = {"macro_auc": None if auc_ci is None else {"low": auc_ci[0], "high": auc_ci[1], "n": 200},
          "accuracy": None if acc_ci is None else {"low": acc_ci[0], "high": acc_ci[1], "n": 200}}
    return {"accuracy": acc, "macro_auc": auc, "ci95": ci, "majority_baseline": majority,
            "classes": CLASSES, "confusion_matrix": [[0, 30, 0], [0, 37, 0], [0, 9, 0]]}


def test_lungs_out_verdict_judges_auc_against_chance_and_accuracy_against_the_majority_class():
    from covidcxr.evaluation.checks import verdict

    majority = {"class": "Non-COVID", "accuracy": 0.487, "macro_f1": 0.218, "tied_with": []}
    normal = _fig(0.297, 0.66, (0.58, 0.74), (0.21, 0.39), majority)
    # The reported case: accuracy 0.297 -> 0.443 without the lungs and a lungs-out AUC still above chance.
    # The old rule compared 0.443 with 1/K = 0.333 and the AUC with what the model kept, and said "OK".
    masked = _fig(0.443, 0.56, (0.51, 0.61), (0.36, 0.52), majority)
    v = verdict(normal, masked, 3)
    assert v.startswith("WARNING") and "above chance" in v and "0.487" in v and "0.333" not in v
    # Same accuracies, lungs-out AUC at chance: the rise in accuracy stays below the majority baseline.
    at_chance = _fig(0.443, 0.50, (0.44, 0.56), (0.36, 0.52), majority)
    v = verdict(normal, at_chance, 3)
    assert v.startswith("OK") and "rose from 0.297 to 0.443" in v and "predicts 'Non-COVID' more often" in v
    # More accurate than always predicting the majority class, beyond the interval: a shortcut.
    v = verdict(normal, _fig(0.62, 0.52, (0.45, 0.58), (0.55, 0.69), majority), 3)
    assert v.startswith("WARNING") and "more accurate (0.620" in v and "'Non-COVID' (0.487)" in v
    # Too few images to tell: the lungs-out interval reaches the AUC with the lungs.
    assert verdict(normal, _fig(0.40, 0.55, (0.42, 0.70), (0.30, 0.50), majority), 3).startswith("INCONCLUSIVE")


def test_majority_baseline_is_always_predicting_the_most_frequent_class():
    rng = np.random.default_rng(0)
    y = np.array([0] * 5 + [1] * 12 + [2] * 3)
    p = rng.dirichlet(np.ones(3), len(y))
    m = F.classification(y, p, CLASSES)
    base = m["majority_baseline"]
    always = np.ones(len(y), int)
    assert base["class"] == "Non-COVID" and base["accuracy"] == skm.accuracy_score(y, always) == 0.6
    assert base["macro_f1"] == skm.f1_score(y, always, average="macro", labels=[0, 1, 2], zero_division=0)
    tie = F.majority_baseline(np.array([0, 0, 2, 2]), CLASSES)
    assert tie["class"] == "COVID-19" and tie["tied_with"] == ["Normal"]


# ------------------------------------------------------------ segmentation intervals and resolution


def _masks(rng, n, size=20):
    truths = [rng.random((size, size)) > 0.5 for _ in range(n)]
    preds = [t ^ (rng.random(t.shape) > 0.7 + 0.03 * i) for i, t in enumerate(truths)]
    return truths, preds


def test_segmentation_intervals_cover_hd95_and_every_class_from_one_draw():
    rng = np.random.default_rng(1)
    truths, preds = _masks(rng, 9)
    preds[0][:] = False  # HD95 undefined for this one
    labels = list("aaabbbccc")
    m = F.segmentation_scores(truths, preds, labels, 100, 3, at_model=list(zip(truths, preds)))
    ref = F.segmentation(truths, preds, labels, 100, 3)
    assert m["ci95"]["dice"] == ref["ci95"]["dice"] and m["ci95"]["iou"] == ref["ci95"]["iou"]  # the same resampling
    assert m["ci95"]["hd95"]["low"] <= m["hd95"] <= m["ci95"]["hd95"]["high"] and m["ci95"]["hd95"]["n"] == 100
    for c, v in m["per_class"].items():
        for k in ("dice", "iou", "hd95"):
            assert v["ci95"][k]["low"] <= v[k] <= v["ci95"][k]["high"], (c, k)
    assert m["per_class"]["a"]["hd95_undefined"] == 1
    at = m["hd95_at_model_resolution"]
    assert at["hd95"] == pytest.approx(m["hd95"]) and at["ci95"]["hd95"] == m["ci95"]["hd95"]
    assert at["per_class"]["b"]["ci95"]["hd95"] == m["per_class"]["b"]["ci95"]["hd95"]
    assert F.segmentation_scores(truths, preds, labels, 0)["ci95"] is None


class _Segmenter:
    """Stands in for a lung segmenter: 32 x 32 output, the truth with a little noise, one image badly wrong."""

    kind = "keras"

    def __init__(self, truths: dict):
        self.truths = truths

    def forward(self, _pred, df, **_kw):
        from covidcxr.data import preprocess as P
        from covidcxr.evaluation.passes import Pass

        rng = np.random.default_rng(0)
        masks = []
        for i, path in enumerate(df["lung_mask"]):
            m = P.resize_mask(self.truths[path], 32).astype(np.float32)
            m = np.clip(m + (rng.random(m.shape) > 0.97) * 0.8, 0, 1)
            masks.append(1 - m if i == 4 else m)
        n = len(df)
        return Pass(np.arange(n), None, np.stack(masks), np.full((n, 2), 64), [None] * n, [])


def _segment_eval(tmp_path, monkeypatch, bootstrap):
    from tests.conftest import random_cxr, write_png

    from covidcxr import artifacts as A
    from covidcxr.evaluation import evaluator as E

    rows, truths = [], {}
    for i in range(8):
        cls = ("COVID-19", "Normal")[i % 2]
        img = write_png(tmp_path / "d" / cls / f"i{i}.png", random_cxr(i, 64))
        t = np.zeros((64, 64), np.uint8)
        t[10 + i:50, 8:28] = t[12:52, 36:56 - i] = 1
        mpath = write_png(tmp_path / "d" / cls / f"m{i}.png", t * 255)
        truths[str(mpath)] = t
        rows.append({"path": str(img), "label": cls, "lung_mask": str(mpath), "infection_mask": "", "split": "test"})
    pd.DataFrame(rows).to_csv(tmp_path / "seg.csv", index=False)
    seg = _Segmenter(truths)
    monkeypatch.setattr(E, "forward", seg.forward)
    ev = E.Evaluator.__new__(E.Evaluator)
    ev.o = E.EvalOptions(model=str(tmp_path / "model"), data=str(tmp_path / "seg.csv"), out=str(tmp_path / "ev"),
                         bootstrap=bootstrap, overlays=2, quiet=True)
    card = A.ModelCard(classes=[], arch="unet", task="segment", image_size=32, target="lung")
    (tmp_path / "model").mkdir()
    ev.loc, ev.card, ev.pred, ev.warnings, ev.log = A.Located("keras", tmp_path / "model", card), card, seg, [], print
    ev.op_spec, ev._val = None, {}
    return ev.run()


def test_segmentation_report_states_replicates_resolution_and_shows_the_worst_cases(tmp_path, monkeypatch, capsys):
    out = _segment_eval(tmp_path, monkeypatch, 40)
    seg = json.loads((out / "metrics.json").read_text())["segmentation"]
    html = (out / "report.html").read_text()
    # (a) the real number of replicates, above intervals that use it
    assert "(40 replicates)" in html and "(0 replicates)" not in html and "40 replicates, resampling" in html
    # (b) HD95 and every class row have intervals
    assert seg["ci95"]["hd95"]["n"] == 40 and all(v["ci95"]["hd95"] for v in seg["per_class"].values())
    assert html.count("<small>[") >= 3 * (1 + len(seg["per_class"]))
    # (c) the resolution every HD95 is measured at, and the training log's
    assert seg["hd95_unit"] == "px at each ground-truth mask's native resolution (64x64)"
    at = seg["hd95_at_model_resolution"]
    assert at["unit"] == "px at the model's 32x32 input" and "training log" in at["training_log"]
    # the training log's own words (covidcxr.training.run.segmentation_line and its metrics.json entry)
    assert "'HD95 ... px at the model's 32x32 input'" in at["training_log"]
    assert "scored_at 'model input 32x32'" in at["training_log"] and "hd95_unit 'px at 32x32'" in at["training_log"]
    per = pd.read_csv(out / "segmentation.csv")
    assert at["hd95"] == pytest.approx(per["hd95_px_model"].mean()) and at["hd95"] != seg["hd95"]
    assert seg["hd95"] == pytest.approx(per["hd95_px_native"].mean())
    assert "HD95 (px at each ground-truth mask&#x27;s native resolution (64x64))" in html
    assert "HD95 at the model's resolution" in html and "the training log (covidcxr.train" in html.lower()
    assert "HD95" in capsys.readouterr().out.split("lung masks (n=8)")[1].split("\n")[0]
    # (d) the lowest-Dice images of each class, and a Dice histogram, in the report
    worst = per[per["label"] == "COVID-19"].nsmallest(1, "dice")["path"].iloc[0]
    assert f"overlays/COVID-19/{Path(worst).stem}.png" in seg["overlays"] and len(seg["overlays"]) == 2
    assert per["dice"].min() < 0.5 and seg["overlay_selection"] == "the lowest-Dice image of each class (worst first)"
    assert (out / "dice_histogram.png").exists() and "Dice per image" in html and "lowest-Dice image of each" in html
    assert html.count("<small>[") >= 3 * (1 + len(seg["per_class"])) + 1  # HD95 at model resolution too


def test_segmentation_report_without_bootstrap_says_so(tmp_path, monkeypatch):
    out = _segment_eval(tmp_path, monkeypatch, 0)
    seg = json.loads((out / "metrics.json").read_text())["segmentation"]
    html = (out / "report.html").read_text()
    assert seg["ci95"] is None and "No bootstrap intervals were computed (--bootstrap 0)" in html
    assert "replicates" not in html


# ------------------------------------------------------------ one-class sets and their label maps


def test_label_map_may_name_classes_a_one_class_set_lacks():
    from covidcxr.errors import ConfigError
    from covidcxr.evaluation.data import parse_label_map

    text = "COVID-19=COVID,Normal=Normal,Non-COVID=Lung_Opacity+Viral Pneumonia"
    lm = parse_label_map(text, CLASSES, ["Lung_Opacity"])
    assert lm.absent == ["COVID", "Normal", "Viral Pneumonia"] and lm.data_label("Lung_Opacity") == "Non-COVID"
    assert "no images of" in lm.warnings()[0]
    with pytest.raises(ConfigError, match="not classes of the data"):  # a class the data has, left unmapped: a typo
        parse_label_map(text.replace("Lung_Opacity", "Lung Opacity"), CLASSES, ["Lung_Opacity"])


def test_single_class_figures_say_what_cannot_be_computed():
    y = np.zeros(10, int)
    p = np.tile([0.7, 0.2, 0.1], (10, 1))
    p[:3] = [0.1, 0.8, 0.1]
    one = F.single_class(y, p, CLASSES)
    assert one["sensitivity"] == 0.7 and one["predicted_counts"] == {"COVID-19": 7, "Non-COVID": 3, "Normal": 0}
    assert one["other_classes"]["Non-COVID"]["specificity"] == 0.7
    w = one["sensitivity_ci95"]
    assert 0.39 < w["low"] < 0.7 < w["high"] < 0.92 and w["method"] == "Wilson score"
    assert F.wilson(10, 10)["high"] == pytest.approx(1.0) and F.wilson(10, 10)["low"] < 0.8
    assert any("AUC" in k for k in one["not_computable"]) and "specificity of COVID-19" in one["not_computable"]


def test_checkpoint_images_by_the_runs_manifest_without_fingerprints():
    from covidcxr.evaluation.data import EvalData, checkpoint_images

    df = pd.DataFrame({"path": list("abcd"), "label": ["x"] * 4, "split": ["train", "train", "val", "val"]})
    ed = EvalData(df[df["split"] == "val"], df, "val", "the run's own data", run_data=True, has_split=True)
    found = checkpoint_images(ed, ed.df, 0, "auto")
    assert found["n"] == 2 and "the run's own val split, by its manifest" in found["warning"] and "train 2, val 2" in found["warning"]
    assert checkpoint_images(EvalData(df, df, "all", "other", has_split=True), df.iloc[:2], 0, "all") is None


# ------------------------------------------------------------ reliability diagram


def test_reliability_bins_with_few_images_look_like_it(tmp_path, saved_figures):
    from covidcxr import plots

    bins = {"edges": list(np.linspace(0, 1, 6)), "accuracy": [None, 1.0, 0.5, 0.7, 0.9],
            "confidence": [None, 0.35, 0.55, 0.7, 0.92], "count": [0, 1, 2, 40, 200]}
    plots.plot_reliability(bins, None, 0.05, None, None, tmp_path / "rel.png", context="test split, n=243")
    ax = saved_figures[0].axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert {"n=1", "n=2", "n=40", "n=200"} <= labels and "n=0" not in labels
    acc = ax.containers[0].patches
    assert acc[1].get_hatch() == "xx" and acc[2].get_hatch() == "xx" and not acc[4].get_hatch()
    assert acc[1].get_alpha() < 0.3 < acc[3].get_alpha() < acc[4].get_alpha()
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "fewer than 10 images" in " ".join(legend.split())


def test_hd95_at_model_resolution_is_the_training_logs_definition():
    """The training log scores the cached masks (truth resized nearest-neighbour to the model's size)
    against the output thresholded at 0.5: segmentation_metrics on those arrays."""
    from covidcxr.data import preprocess as P
    from covidcxr.segmetrics import segmentation_metrics

    rng = np.random.default_rng(2)
    truths = [np.zeros((64, 64), np.uint8) for _ in range(4)]
    for i, t in enumerate(truths):
        t[8 + i:40, 10:30 + i] = 1
    probs = [np.clip(P.resize_mask(t, 32) * 0.9 + rng.random((32, 32)) * 0.3, 0, 1) for t in truths]
    at_model = [(P.resize_mask(t, 32).astype(bool), p >= 0.5) for t, p in zip(truths, probs)]
    preds = [P.mask_from_probs(p, 64, 64) for p in probs]
    m = F.segmentation_scores(truths, preds, ["a"] * 4, 0, 0, at_model)
    log = segmentation_metrics(np.stack([P.resize_mask(t, 32) for t in truths]), np.stack(probs))
    assert m["hd95_at_model_resolution"]["hd95"] == pytest.approx(log["hd95"])

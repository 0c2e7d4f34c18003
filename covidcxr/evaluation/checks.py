"""Probes that re-run the model on changed inputs: test-time augmentation, the lungs-out
shortcut probe, and the temperature fit for calibration."""
from __future__ import annotations

import numpy as np
import pandas as pd

from covidcxr.calibration import fit_temperature as fit
from covidcxr.evaluation import figures as F
from covidcxr.evaluation.passes import forward

TTA_VIEWS = ((0.0, 1.0), (5.0, 1.0), (-5.0, 1.0), (0.0, 1.08))  # (degrees, zoom); no flips (they move the heart)
KEYS = ("accuracy", "macro_f1", "macro_auc", "ece", "cosine_similarity")


def tta(predictor, df: pd.DataFrame, rows: np.ndarray, y: np.ndarray, classes, merge, bootstrap, seed, quiet) -> dict:
    """Figures of the probabilities averaged over ``TTA_VIEWS`` (``merge`` maps model probabilities
    to the evaluation classes)."""
    sub = df.iloc[rows].reset_index(drop=True)
    views = []
    for v in TTA_VIEWS:
        p = forward(predictor, sub, view=v, quiet=quiet, desc=f"TTA view {v}")
        if len(p.rows) != len(sub):
            raise RuntimeError("test-time augmentation read a different set of images than the plain pass")
        views.append(merge(p.probs))
    fig = F.classification(y, np.mean(views, axis=0), classes, bootstrap, seed)
    return {"views": [{"rotation_deg": a, "zoom": z} for a, z in TTA_VIEWS], **{k: fig[k] for k in KEYS},
            "ci95": fig.get("ci95"), "per_class": fig["per_class"]}


def lungs_out(predictor, df: pd.DataFrame, rows: np.ndarray, y: np.ndarray, probs: np.ndarray, classes, merge,
              bootstrap, seed, quiet) -> dict:
    """The shortcut probe: the same images with their lung fields blacked out, judged on the
    macro-AUC against chance (0.5) and the accuracy against always predicting the majority class,
    with bootstrap intervals (at least ``PROBE_REPLICATES``, whatever --bootstrap says)."""
    sub = df.iloc[rows].reset_index(drop=True)
    has = (sub["lung_mask"].astype(str) != "").to_numpy() if "lung_mask" in sub else np.zeros(len(sub), bool)
    if not has.any():
        return {"n": 0, "verdict": "no lung masks in this data: the shortcut probe could not run."}
    sub, y_m, p_n = sub[has].reset_index(drop=True), y[has], probs[has]
    p = forward(predictor, sub, lungs_out=True, quiet=quiet, desc="lungs blacked out")
    keep, reps = p.rows, max(bootstrap, PROBE_REPLICATES)
    normal = F.classification(y_m[keep], p_n[keep], classes, reps, seed)
    masked = F.classification(y_m[keep], merge(p.probs), classes, reps, seed)

    def part(fig: dict) -> dict:
        return {**{k: fig[k] for k in ("accuracy", "macro_f1", "macro_auc", "ece")},
                "ci95": {k: (fig["ci95"] or {}).get(k) for k in ("accuracy", "macro_auc")},
                "predicted_counts": dict(zip(classes, np.sum(fig["confusion_matrix"], axis=0).tolist()))}

    return {"n": int(len(keep)), "classes_with_masks": sorted(sub["label"].iloc[keep].unique().tolist()),
            "normal": part(normal), "lungs_masked": part(masked), "majority_baseline": normal["majority_baseline"],
            "bootstrap_replicates": reps, "normal_auc_ci95": (normal["ci95"] or {}).get("macro_auc"),
            "verdict": verdict(normal, masked, len(classes))}


PROBE_REPLICATES = 200
SHORTCUT_AUC = 0.6   # without an interval (hand-made figures): a lungs-out macro-AUC at or above this is a shortcut


def _ci(fig: dict, key: str) -> dict | None:
    return (fig.get("ci95") or {}).get(key)


def _majority_text(majority: dict | None) -> str:
    if not majority:
        return "the majority-class baseline (not known here)"
    tied = f" (tied with {', '.join(majority['tied_with'])})" if majority.get("tied_with") else ""
    return f"{majority['accuracy']:.3f} for always predicting the majority class '{majority['class']}'{tied}"


def _signs(masked: dict, majority: dict | None) -> list[str]:
    """What is still beyond chance with the lungs blacked out: the macro-AUC against 0.5 and the
    accuracy against the majority-class baseline (beyond their 95% intervals, when known)."""
    signs = []
    auc, ci = masked["macro_auc"], _ci(masked, "macro_auc")
    if (ci["low"] > 0.5) if ci else auc >= SHORTCUT_AUC:
        signs.append(f"it still ranks the classes above chance (macro-AUC {auc:.3f}"
                     + (f", 95% CI lower end {ci['low']:.3f}" if ci else "") + " > 0.5)")
    elif ci and ci["high"] < 0.5:
        signs.append(f"it ranks the classes below chance (macro-AUC {auc:.3f}, 95% CI upper end {ci['high']:.3f} "
                     f"< 0.5): its output still depends on the class")
    acc, aci = masked["accuracy"], _ci(masked, "accuracy")
    if majority and ((aci["low"] > majority["accuracy"]) if aci else acc > majority["accuracy"]):
        signs.append(f"it is more accurate ({acc:.3f}" + (f", 95% CI lower end {aci['low']:.3f}" if aci else "")
                     + f") than always predicting the majority class '{majority['class']}' "
                       f"({majority['accuracy']:.3f})")
    return signs


def _rise_note(normal: dict, masked: dict, majority: dict | None) -> str:
    """Accuracy that rises without the lungs but stays at or below the majority-class baseline."""
    if not majority or masked["accuracy"] <= normal["accuracy"]:
        return ""
    cm = masked.get("confusion_matrix")
    top = (f": it predicts '{masked['classes'][int(np.argmax(np.sum(cm, axis=0)))]}' more often"
           if cm is not None and masked.get("classes") else "")
    return (f" Its accuracy rose from {normal['accuracy']:.3f} to {masked['accuracy']:.3f} without the lungs, yet "
            f"stays at or below the majority-class baseline {majority['accuracy']:.3f}{top}, which is no evidence of "
            f"a shortcut.")


def verdict(normal: dict, masked: dict, k: int | None = None) -> str:
    """WARNING when, with the lung fields blacked out, the macro-AUC is still above chance (0.5) or the
    accuracy above always predicting the majority class (beyond their 95% intervals); else OK, but only
    for a model above chance on these images (the lower end of its macro-AUC interval above 0.5) and a
    lungs-out interval that stays below its AUC (else INCONCLUSIVE). ``k`` (the number of classes) is
    not used: chance accuracy is the majority class's share, not 1/k."""
    auc_n, auc_m = normal.get("macro_auc"), masked.get("macro_auc")
    if auc_n is None or auc_m is None:
        return "not applicable: not enough classes with lung masks to compare AUCs."
    majority = masked.get("majority_baseline") or normal.get("majority_baseline")
    ci_m = _ci(masked, "macro_auc")
    base = (f"with the lung fields blacked out: macro-AUC {auc_m:.3f}"
            + (f" [{ci_m['low']:.3f}, {ci_m['high']:.3f}]" if ci_m else "") + f" vs 0.5 for chance ({auc_n:.3f} "
            f"with them), accuracy {masked['accuracy']:.3f} vs {_majority_text(majority)} "
            f"({normal['accuracy']:.3f} with them)")
    signs = _signs(masked, majority)
    if signs:
        return (f"WARNING: {base}. Without the lungs {'; and '.join(signs)}: the model leans on what lies outside "
                f"them (text, devices, borders, body habitus), a known shortcut in COVID CXR datasets. Treat its "
                f"figures with caution.")
    ci = _ci(normal, "macro_auc")
    if ci is None or ci["low"] <= 0.5:
        low = "n/a" if ci is None else f"{ci['low']:.3f}"
        return (f"not applicable: the model is not above chance on these images (macro-AUC {auc_n:.3f}, 95% CI "
                f"lower end {low} <= 0.5), so a drop or rise without the lungs says nothing; {base}.")
    if ci_m and ci_m["high"] >= auc_n:
        return (f"INCONCLUSIVE: {base}. The lungs-out interval still reaches the macro-AUC with the lungs visible "
                f"({auc_n:.3f}): too few images to tell a model that needs the lungs from one that does not.")
    return (f"OK: {base}. Without the lungs the model ranks the classes no better than chance"
            + (" and is no more accurate than always predicting the majority class." if majority else
               " (accuracy not judged: the majority-class baseline is not known).")
            + _rise_note(normal, masked, majority))


def fit_temperature(predictor, df: pd.DataFrame, classes, note: str, quiet: bool, keep: dict | None = None):
    """(temperature, n) fitted on ``df`` (model classes), or (None, reason); ``keep`` receives the pass
    ({"y", "probs", "n", "note"}) for the operating point to reuse."""
    df = df[df["label"].isin(classes)].reset_index(drop=True)
    if len(df) < 2:
        return None, f"{note}: too few images, temperature not fitted"
    p = forward(predictor, df, quiet=quiet, desc="calibration split")
    if len(p.rows) < 2:
        return None, f"{note}: too few readable images, temperature not fitted"
    y = F.label_index(df["label"].iloc[p.rows], classes)
    if keep is not None:
        keep.update(y=y, probs=p.probs, n=len(p.rows), note=note)
    return (fit(y, p.probs), len(p.rows)), note

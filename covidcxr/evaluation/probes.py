"""Probes that re-run the model on changed inputs: test-time augmentation, the lungs-out
shortcut probe, and the temperature fit for calibration."""
from __future__ import annotations

import numpy as np
import pandas as pd

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
    """The shortcut probe: the same images with their lung fields blacked out."""
    sub = df.iloc[rows].reset_index(drop=True)
    has = (sub["lung_mask"].astype(str) != "").to_numpy() if "lung_mask" in sub else np.zeros(len(sub), bool)
    if not has.any():
        return {"n": 0, "verdict": "no lung masks in this data: the shortcut probe could not run."}
    sub, y_m, p_n = sub[has].reset_index(drop=True), y[has], probs[has]
    p = forward(predictor, sub, lungs_out=True, quiet=quiet, desc="lungs blacked out")
    keep = p.rows
    normal = F.classification(y_m[keep], p_n[keep], classes, max(bootstrap, 200), seed)
    masked = F.classification(y_m[keep], merge(p.probs), classes, 0, seed)
    keys = ("accuracy", "macro_f1", "macro_auc", "ece")
    return {"n": int(len(keep)), "classes_with_masks": sorted(sub["label"].iloc[keep].unique().tolist()),
            "normal": {k: normal[k] for k in keys}, "lungs_masked": {k: masked[k] for k in keys},
            "normal_auc_ci95": (normal["ci95"] or {}).get("macro_auc"),
            "verdict": verdict(normal, masked, len(classes))}


def verdict(normal: dict, masked: dict, k: int) -> str:
    """Only a model above chance on these images (the lower end of its macro-AUC interval above 0.5)
    can be said to lean, or not, on what lies outside the lungs."""
    auc_n, auc_m = normal.get("macro_auc"), masked.get("macro_auc")
    if auc_n is None or auc_m is None:
        return "not applicable: not enough classes with lung masks to compare AUCs."
    ci = (normal.get("ci95") or {}).get("macro_auc")
    base = (f"with the lung fields blacked out: macro-AUC {auc_m:.3f} (vs {auc_n:.3f} with them), accuracy "
            f"{masked['accuracy']:.3f} (chance {1 / k:.3f})")
    if ci is None or ci["low"] <= 0.5:
        low = "n/a" if ci is None else f"{ci['low']:.3f}"
        return (f"not applicable: the model is not above chance on these images (macro-AUC {auc_n:.3f}, 95% CI "
                f"lower end {low} <= 0.5), so a drop or rise without the lungs says nothing; {base}.")
    retained = (auc_m - 0.5) / (auc_n - 0.5)
    if auc_m >= 0.7 or retained >= 0.5:
        return (f"WARNING: {base}. The model keeps {retained:.0%} of its above-chance AUC without the lungs: it leans "
                f"on what lies outside them (text, devices, borders, body habitus), a known shortcut in COVID CXR "
                f"datasets. Treat its figures with caution.")
    return f"OK: {base}. Without the lungs the model keeps {max(retained, 0):.0%} of its above-chance AUC."


def fit_temperature(predictor, df: pd.DataFrame, classes, note: str, quiet: bool):
    """(temperature, n) fitted on ``df`` (model classes), or (None, reason)."""
    from covidcxr.calibration import fit_temperature as fit

    df = df[df["label"].isin(classes)].reset_index(drop=True)
    if len(df) < 2:
        return None, f"{note}: too few images, temperature not fitted"
    p = forward(predictor, df, quiet=quiet, desc="calibration split")
    if len(p.rows) < 2:
        return None, f"{note}: too few readable images, temperature not fitted"
    return (fit(F.label_index(df["label"].iloc[p.rows], classes), p.probs), len(p.rows)), note

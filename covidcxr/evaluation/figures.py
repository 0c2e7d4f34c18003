"""The numbers of an evaluation, from one forward pass's outputs.

Classification: accuracy, macro/weighted precision/recall/F1, per-class sensitivity,
specificity, ROC-AUC and average precision, micro/macro AUC, cosine similarity, ECE, NLL,
the reliability bins and stratified bootstrap CIs. Segmentation: Dice, IoU and HD95 per image
at each ground-truth mask's own resolution, their means overall and per class of image, and
bootstrap CIs of the mean Dice and IoU.
"""
from __future__ import annotations

import numpy as np

from covidcxr.calibration import ece, nll, reliability_bins
from covidcxr.metrics import bootstrap_ci, classification_metrics, cosine_similarity


def classification(y: np.ndarray, probs: np.ndarray, classes: list[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """Every classification figure for true indices ``y`` and probabilities ``probs``."""
    from sklearn.metrics import roc_auc_score

    probs = np.asarray(probs, np.float64)
    m = classification_metrics(y, probs, classes)
    m["cosine_similarity"] = cosine_similarity(y, probs)
    m["ece"] = ece(y, probs)
    m["nll"] = nll(np.asarray(y, int), probs) if len(y) else None
    onehot = np.eye(len(classes))[np.asarray(y, int)]
    m["micro_auc"] = (float(roc_auc_score(onehot.ravel(), probs.ravel()))
                      if len(y) and 0 < onehot.sum() < onehot.size else None)
    m["reliability"] = reliability_bins(y, probs)
    m["ci95"] = bootstrap_ci(y, probs, classes, n=bootstrap, seed=seed) if bootstrap else None
    return m


def label_index(labels, classes: list[str]) -> np.ndarray:
    look = {c: i for i, c in enumerate(classes)}
    return np.array([look[c] for c in labels], int)


def mean_ci(values: np.ndarray, strata: np.ndarray, n: int, seed: int, level: float = 0.95) -> dict | None:
    """Percentile interval of the mean by stratified bootstrap (resampling within each stratum)."""
    values = np.asarray(values, float)
    ok = np.isfinite(values)
    values, strata = values[ok], np.asarray(strata)[ok]
    if not n or not len(values):
        return None
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    reps = [values[np.concatenate([rng.choice(g, len(g)) for g in groups])].mean() for _ in range(n)]
    a = (1 - level) / 2
    return {"low": float(np.quantile(reps, a)), "high": float(np.quantile(reps, 1 - a)), "n": int(n)}


def segmentation(truths: list[np.ndarray], preds: list[np.ndarray], labels: list[str], bootstrap: int = 0,
                 seed: int = 0) -> dict:
    """Dice/IoU/HD95 of boolean predictions against boolean truths (same sizes, pair by pair)."""
    from covidcxr.segmetrics import segmentation_metrics

    m = segmentation_metrics(truths, [p.astype(np.float32) for p in preds], labels)
    per = m["per_image"]
    m["ci95"] = ({"dice": mean_ci(np.array(per["dice"]), np.array(labels), bootstrap, seed),
                  "iou": mean_ci(np.array(per["iou"]), np.array(labels), bootstrap, seed)} if bootstrap else None)
    return m

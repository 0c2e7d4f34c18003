"""The numbers of an evaluation, from one forward pass's outputs.

Classification: accuracy, macro/weighted precision/recall/F1, per-class sensitivity,
specificity, ROC-AUC and average precision, micro/macro AUC, cosine similarity, ECE, NLL,
the reliability bins, the majority-class baseline and stratified bootstrap CIs. One class
only (an external set of positives): ``single_class``. Segmentation: Dice, IoU and HD95 per
image at each ground-truth mask's own resolution, their means overall and per class of image,
and bootstrap CIs of every mean, overall and per class, from one resampling of the images
(``segmentation_intervals``).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm
from sklearn.metrics import f1_score
from sklearn.metrics import roc_auc_score

from covidcxr.calibration import ece, nll, reliability_bins
from covidcxr.metrics import bootstrap_ci, classification_metrics, cosine_similarity
from covidcxr.segmetrics import hd95, segmentation_metrics


def classification(y: np.ndarray, probs: np.ndarray, classes: list[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """Every classification figure for true indices ``y`` and probabilities ``probs``."""
    probs = np.asarray(probs, np.float64)
    m = classification_metrics(y, probs, classes)
    m["cosine_similarity"] = cosine_similarity(y, probs)
    m["ece"] = ece(y, probs)
    m["nll"] = nll(np.asarray(y, int), probs) if len(y) else None
    onehot = np.eye(len(classes))[np.asarray(y, int)]
    m["micro_auc"] = (float(roc_auc_score(onehot.ravel(), probs.ravel()))
                      if len(y) and 0 < onehot.sum() < onehot.size else None)
    m["reliability"] = reliability_bins(y, probs)
    m["majority_baseline"] = majority_baseline(y, classes)
    m["ci95"] = bootstrap_ci(y, probs, classes, n=bootstrap, seed=seed) if bootstrap else None
    return m


def majority_baseline(y: np.ndarray, classes: list[str]) -> dict | None:
    """Always predicting the most frequent true class of the scored set (ties: the first in class
    order): its accuracy (that class's share) and macro-F1 over the same classes as ``macro_f1``."""
    y = np.asarray(y, int)
    if not len(y):
        return None
    counts = np.bincount(y, minlength=len(classes))
    top = int(counts.argmax())
    f1 = f1_score(y, np.full(len(y), top), labels=list(range(len(classes))), average="macro", zero_division=0)
    tied = [classes[i] for i in np.flatnonzero(counts == counts[top]) if i != top]
    return {"class": classes[top], "accuracy": float(counts[top] / len(y)), "macro_f1": float(f1),
            "tied_with": tied}


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
    m = segmentation_metrics(truths, [p.astype(np.float32) for p in preds], labels)
    per = m["per_image"]
    m["ci95"] = ({"dice": mean_ci(np.array(per["dice"]), np.array(labels), bootstrap, seed),
                  "iou": mean_ci(np.array(per["iou"]), np.array(labels), bootstrap, seed)} if bootstrap else None)
    return m


def _finite_mean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _mean_or_none(v: np.ndarray) -> float | None:
    m = _finite_mean(np.asarray(v, float))
    return None if np.isnan(m) else m


def _interval(reps: list[float], n: int, level: float) -> dict | None:
    v = np.asarray(reps, float)
    v = v[np.isfinite(v)]
    a = (1 - level) / 2
    return {"low": float(np.quantile(v, a)), "high": float(np.quantile(v, 1 - a)), "n": int(n)} if len(v) else None


def segmentation_intervals(per_image: dict, labels, n: int, seed: int, level: float = 0.95) -> tuple[dict, dict]:
    """(overall, {class: ...}) percentile intervals of the mean of every per-image column (non-finite
    values, an undefined HD95, left out of that mean, as in the point estimate), from one stratified
    resampling of the images: each replicate redraws, with replacement, every class's images, and a
    class's interval is its part of the same draw. Dice and IoU equal ``mean_ci``'s."""
    labels = np.asarray(labels)
    cols = {k: np.asarray(v, float) for k, v in per_image.items()}
    names = [str(c) for c in np.unique(labels)]
    groups = [np.flatnonzero(labels == c) for c in names]
    rng = np.random.default_rng(seed)
    reps = {k: [] for k in cols}
    per = {c: {k: [] for k in cols} for c in names}
    for _ in range(n):
        draws = [rng.choice(g, len(g)) for g in groups]
        idx = np.concatenate(draws)
        for k, v in cols.items():
            reps[k].append(_finite_mean(v[idx]))
            for c, d in zip(names, draws):
                per[c][k].append(_finite_mean(v[d]))
    return ({k: _interval(r, n, level) for k, r in reps.items()},
            {c: {k: _interval(r, n, level) for k, r in col.items()} for c, col in per.items()})


SEG_MEANS = ("dice", "iou", "hd95")


def segmentation_scores(truths, preds, labels, bootstrap: int = 0, seed: int = 0, at_model=None) -> dict:
    """``segmentation`` plus intervals of every mean, overall and per class, and, given ``at_model``
    ((truth, prediction) pairs at the model's input resolution, where its masks come out and the
    training log scores them), HD95 there too."""
    m = segmentation(truths, preds, labels, 0, seed)
    per = m["per_image"]
    if at_model is not None:
        per["hd95_model"] = [hd95(t, p) for t, p in at_model]
    overall, by_class = segmentation_intervals(per, labels, bootstrap, seed) if bootstrap else ({}, {})
    m["ci95"] = {k: overall[k] for k in SEG_MEANS} if bootstrap else None
    for c, v in m["per_class"].items():
        v["ci95"] = {k: by_class[c][k] for k in SEG_MEANS} if bootstrap else None
    if at_model is not None:
        h, lab = np.asarray(per["hd95_model"], float), np.asarray(labels)
        m["hd95_at_model_resolution"] = {
            "hd95": _mean_or_none(h), "hd95_undefined": int((~np.isfinite(h)).sum()),
            "ci95": {"hd95": overall["hd95_model"]} if bootstrap else None,
            "per_class": {c: {"hd95": _mean_or_none(h[lab == c]),
                              "ci95": {"hd95": by_class[c]["hd95_model"]} if bootstrap else None}
                          for c in m["per_class"]}}
    return m


# ---------------------------------------------------------------- one class only


def wilson(k: int, n: int, level: float = 0.95) -> dict | None:
    """Wilson score interval of the proportion k/n (sound at 0/n and n/n, unlike a bootstrap)."""
    if not n:
        return None
    z, p = float(norm.ppf(1 - (1 - level) / 2)), k / n
    d = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return {"low": float(max(0.0, centre - half)), "high": float(min(1.0, centre + half)), "method": "Wilson score"}


def not_computable(c: str, classes: list[str]) -> dict:
    """What a set holding only class ``c`` cannot give, and why."""
    others = [o for o in classes if o != c]
    return {
        "ROC-AUC (per class, macro, micro) and average precision": f"they rank images of a class against images of "
        f"other classes; every image here is {c}, so there is nothing to rank them against",
        f"specificity of {c}": f"needs images that are not {c} (negatives); there are none",
        f"precision (PPV) of {c}, F1 and macro-F1": f"every image is {c}, so precision is 1 whenever {c} is "
        f"predicted: it reflects this set's 100% prevalence, not the model, and F1 inherits that",
        f"sensitivity of {', '.join(others)}": "this set has no images of them",
        "ECE, reliability diagram and temperature scaling": f"on one class they would reward (and fit) always "
        f"predicting {c}; the distribution of the predicted probability describes the scores instead",
    }


def single_class(y: np.ndarray, probs: np.ndarray, classes: list[str], level: float = 0.95) -> dict:
    """What images of one class can say: n, the share predicted as that class (its sensitivity,
    with a Wilson interval), the predicted-class counts, each other class's specificity (these
    images are all negatives for it), the distribution of the class's predicted probability, and
    what cannot be computed, with why."""
    y, probs = np.asarray(y, int), np.asarray(probs, np.float64)
    k, n, pred = int(y[0]), len(y), probs.argmax(axis=1)
    c, p, hit = classes[k], probs[:, k], int((pred == k).sum())
    counts, edges = np.histogram(p, bins=20, range=(0.0, 1.0))
    qs = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {
        "class": c, "n": int(n), "correct": hit, "sensitivity": hit / n, "sensitivity_ci95": wilson(hit, n, level),
        "predicted_counts": {o: int((pred == j).sum()) for j, o in enumerate(classes)},
        "other_classes": {o: {"predicted": int((pred == j).sum()), "specificity": float(np.mean(pred != j))}
                          for j, o in enumerate(classes) if j != k},
        "probability": {"of_class": c, "mean": float(p.mean()), "std": float(p.std()), "min": float(p.min()),
                        "max": float(p.max()), "quantiles": {f"{q:.0%}": float(np.quantile(p, q)) for q in qs},
                        "histogram": {"edges": np.round(edges, 6).tolist(), "counts": counts.tolist()}},
        "not_computable": not_computable(c, classes),
    }

"""Classification figures from true labels and predicted probabilities (sklearn)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm


def _safe_auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    if y_bin.min() == y_bin.max():
        return None  # undefined with one class present
    return float(skm.roc_auc_score(y_bin, score))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro/weighted precision, recall and F1, per-class figures
    (precision, recall = sensitivity, specificity, F1, support, one-vs-rest
    ROC-AUC and average precision), macro ROC-AUC, confusion matrix."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    per_class = {}
    aucs = []
    for i, c in enumerate(class_names):
        yb = (y_true == i).astype(int)
        tn = cm.sum() - cm[i, :].sum() - cm[:, i].sum() + cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        auc = _safe_auc(yb, probs[:, i])
        if auc is not None:
            aucs.append(auc)
        per_class[c] = {
            "precision": float(p[i]), "recall": float(r[i]), "sensitivity": float(r[i]),
            "specificity": float(tn / (tn + fp)) if (tn + fp) else None,
            "f1": float(f[i]), "support": int(s[i]), "roc_auc": auc,
            "average_precision": float(skm.average_precision_score(yb, probs[:, i])) if yb.any() else None,
        }
    mp, mr, mf, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro",
                                                        zero_division=0)
    wp, wr, wf, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted",
                                                        zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "macro_precision": float(mp), "macro_recall": float(mr), "macro_f1": float(mf),
        "weighted_precision": float(wp), "weighted_recall": float(wr), "weighted_f1": float(wf),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(class_names),
        "classification_report": skm.classification_report(
            y_true, y_pred, labels=labels, target_names=class_names, zero_division=0, digits=4),
    }


def cosine_similarity(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean over images of cos(probabilities, one-hot target) = p_y / ||p||."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, np.float64)
    if len(y_true) == 0:
        return float("nan")
    norms = np.linalg.norm(probs, axis=1)
    return float(np.mean(probs[np.arange(len(y_true)), y_true] / np.maximum(norms, 1e-12)))


def covid_class(class_names: list[str]) -> str | None:
    """The COVID-19 class by name ('COVID', 'COVID-19', 'covid19'...), not 'Non-COVID'."""
    for c in class_names:
        key = c.lower().replace("-", "").replace("_", "").replace(" ", "")
        if key.startswith("covid"):
            return c
    return None


def _fast_auc(yb: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC with average ranks for ties (equals sklearn's roc_auc_score)."""
    n_pos = int(yb.sum())
    n_neg = len(yb) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[yb == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def headline(y: np.ndarray, probs: np.ndarray, k: int, covid: int | None) -> dict:
    """accuracy, macro-F1, macro-AUC and COVID sensitivity, fast (used by the bootstrap)."""
    pred = probs.argmax(axis=1)
    f1s, aucs = [], []
    for i in range(k):
        tp = np.sum((pred == i) & (y == i))
        fp = np.sum((pred == i) & (y != i))
        fn = np.sum((pred != i) & (y == i))
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
        a = _fast_auc((y == i).astype(int), probs[:, i])
        if np.isfinite(a):
            aucs.append(a)
    out = {"accuracy": float(np.mean(pred == y)), "macro_f1": float(np.mean(f1s)),
           "macro_auc": float(np.mean(aucs)) if aucs else float("nan")}
    if covid is not None:
        pos = y == covid
        out["covid_sensitivity"] = float(np.mean(pred[pos] == covid)) if pos.any() else float("nan")
    return out


def bootstrap_ci(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """Percentile confidence intervals by stratified bootstrap: each replicate resamples,
    with replacement, the same number of images from every true class. Returns
    {metric: {"low", "high", "n"}} for accuracy, macro_f1, macro_auc, covid_sensitivity."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, np.float64)
    k = len(class_names)
    cname = covid_class(class_names)
    covid = class_names.index(cname) if cname else None
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == i) for i in range(k)]
    groups = [g for g in groups if len(g)]
    reps: dict[str, list[float]] = {}
    for _ in range(n):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        for key, v in headline(y_true[idx], probs[idx], k, covid).items():
            reps.setdefault(key, []).append(v)
    alpha = (1 - level) / 2
    out = {}
    for key, vals in reps.items():
        v = np.asarray(vals)
        v = v[np.isfinite(v)]
        out[key] = ({"low": float(np.quantile(v, alpha)), "high": float(np.quantile(v, 1 - alpha)), "n": int(n)}
                    if len(v) else None)
    if cname:
        out["covid_class"] = cname
    return out

"""Classification figures from true labels and predicted probabilities (sklearn)."""
from __future__ import annotations

import numpy as np
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

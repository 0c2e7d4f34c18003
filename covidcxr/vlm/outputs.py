"""The outputs of a zero-shot run, with the names and keys of ``covidcxr.evaluate``.

- ``write_classification``: predictions.csv, the plots and the figures; ``finish``: metrics.json
  and report.html.
- ``seg_target``: which ground-truth mask a segmentation prompt is scored against.
- ``SegScores`` / ``overlay_grid``: Dice, IoU and HD95 per image as masks stream by (at each
  ground-truth mask's own resolution, with covidcxr.segmetrics' definitions), summarised as
  ``evaluation.figures.segmentation`` summarises them; a grid of masks over the X-rays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.imageio import read_image, read_mask
from covidcxr.evaluation import visuals
from covidcxr.evaluation import figures as F
from covidcxr.evaluation.data import EvalData, data_summary
from covidcxr.evaluation.figures import mean_ci
from covidcxr.evaluation.report import write, write_metrics
from covidcxr.masks import overlay
from covidcxr.plots import plot_confusion, plot_image_grid, plot_pr, plot_reliability, plot_roc
from covidcxr.segmetrics import dice, hd95, iou


def finish(out: Path, m: dict, rows: EvalData) -> None:
    """data_summary, metrics.json and report.html (the keys ``evaluation.report.write`` reads)."""
    m["data_summary"] = data_summary(rows.df_all, rows.df, rows.has_split, m["skipped"])
    write_metrics(out, m)
    write(out, m)


def write_classification(out: Path, m: dict, kept: pd.DataFrame, probs: np.ndarray, scores: np.ndarray | None,
                         bootstrap: int, seed: int) -> str:
    """Figures into ``m``; predictions.csv (prob_<class>, and score_<class> for raw sigmoid scores) and the
    plots into ``out``. Returns the plot context ("<split> split, n=<n>")."""
    classes = m["classes"]
    y = F.label_index(kept["label"], classes)
    m.update(F.classification(y, probs, classes, bootstrap, seed))
    m["bootstrap"] = {"replicates": bootstrap, "seed": seed, "stratified": True} if bootstrap else None
    m["calibration"] = {"bins": 15, "ece_before": m["ece"], "ece_after": None, "temperature": None,
                        "note": "zero-shot: no temperature fitted (no labelled data is used)"}
    pred = pd.DataFrame({"path": kept["path"].to_numpy(), "true_label": kept["label"].to_numpy(),
                         "pred_label": [classes[i] for i in probs.argmax(axis=1)]})
    for i, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, i]
    for i, c in enumerate(classes if scores is not None else []):
        pred[f"score_{c}"] = scores[:, i]
    pred.to_csv(out / "predictions.csv", index=False, float_format="%.17g")
    context = f"{m['split']} split, n={m['n']}"
    plot_confusion(m["confusion_matrix"], classes, out / "confusion_matrix.png", "zero-shot", context=context)
    plot_roc(y, probs, classes, out / "roc.png", context=context)
    plot_pr(y, probs, classes, out / "pr.png", context=context)
    plot_reliability(m["reliability"], None, m["ece"], None, None, out / "reliability.png", context=context)
    visuals.examples(kept, y, probs, classes, out, context, seed=seed)
    return context


# ---------------------------------------------------------------- segmentation

# Which ground-truth column a prompt is scored against: prompt-set names first, then words of the prompt.
TARGET_OF_SET = {"lungs": "lung", "opacity": "infection"}
INFECTION_WORDS = ("opacit", "consolidation", "infection", "infiltrat", "ground-glass", "ground glass", "lesion",
                   "pneumonia", "covid")


def seg_target(prompt: str, phrasings: list[str], override: str | None = None) -> str | None:
    """'lung', 'infection' or None (not scored) for a segmentation prompt; ``override`` ('none': None) wins."""
    if override:
        return None if override == "none" else override
    if prompt in TARGET_OF_SET:
        return TARGET_OF_SET[prompt]
    text = " ".join([prompt, *phrasings]).lower()
    if any(w in text for w in INFECTION_WORDS):
        return "infection"
    return "lung" if "lung" in text else None


class SegScores:
    """Dice, IoU and HD95 per image, added as masks stream by (no mask is kept), summarised with the
    keys of ``evaluation.figures.segmentation`` (n, dice, iou, hd95, hd95_undefined, per_class, ci95)."""

    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []
        self.labels: list[str] = []

    def add(self, truth: np.ndarray, pred: np.ndarray, label: str) -> tuple[float, float, float]:
        """Score one pair (truth: {0, 1} or bool; pred: bool; the same shape); returns (dice, iou, hd95)."""
        t, p = np.asarray(truth) >= 0.5, np.asarray(pred, bool)
        if t.shape != p.shape:
            raise ValueError(f"mask shapes differ: truth {t.shape}, prediction {p.shape}")
        row = (dice(t, p), iou(t, p), hd95(t, p))
        self.rows.append(row)
        self.labels.append(label)
        return row

    @staticmethod
    def _summary(arr: np.ndarray) -> dict:
        h = arr[:, 2][np.isfinite(arr[:, 2])]
        return {"n": int(len(arr)), "dice": float(arr[:, 0].mean()) if len(arr) else None,
                "iou": float(arr[:, 1].mean()) if len(arr) else None,
                "hd95": float(h.mean()) if len(h) else None, "hd95_undefined": int(len(arr) - len(h))}

    def summary(self, bootstrap: int, seed: int) -> dict:
        arr, labels = np.array(self.rows, float).reshape(-1, 3), np.array(self.labels)
        out = self._summary(arr)
        out["per_class"] = {c: self._summary(arr[labels == c]) for c in sorted(set(self.labels))}
        out["ci95"] = ({"dice": mean_ci(arr[:, 0], labels, bootstrap, seed),
                        "iou": mean_ci(arr[:, 1], labels, bootstrap, seed)} if bootstrap else None)
        return out


def overlay_picks(df: pd.DataFrame, eligible: np.ndarray, n: int, seed: int) -> set[int]:
    """Up to ``n`` row indices among ``eligible``, spread evenly over the classes (seeded)."""
    rng, labels = np.random.default_rng(seed), df["label"].to_numpy()
    classes = sorted(set(labels[eligible])) if eligible.any() else []
    per = int(np.ceil(n / max(1, len(classes)))) if n else 0
    picks = set()
    for c in classes:
        idx = np.flatnonzero(eligible & (labels == c))
        picks |= {int(i) for i in rng.choice(idx, size=min(per, len(idx)), replace=False)}
    return picks


def overlay_grid(df: pd.DataFrame, preds: dict[int, np.ndarray], truth_col: str | None, dice: dict[int, float],
                 out: Path, title: str, context: str) -> Path | None:
    """segmentation.png: each picked image with its predicted mask (red) and, where known, the truth (green)."""
    rows: dict[str, list] = {}
    for i in sorted(preds):
        gray = read_image(df["path"].iloc[i])
        truth_path = df[truth_col].iloc[i] if truth_col else ""
        truth = read_mask(truth_path, (gray.shape[1], gray.shape[0])) if truth_path else None
        caption = Path(df["path"].iloc[i]).name + (f"\nDice {dice[i]:.3f}" if i in dice else "")
        rows.setdefault(df["label"].iloc[i], []).append((overlay(gray, preds[i], truth), caption, "black"))
    if not rows:
        return None
    return plot_image_grid(sorted(rows.items()), out / "segmentation.png", title, context=context)

"""Calibration: expected calibration error and temperature scaling.

The classifiers end in a softmax, so ``log p`` equals the logits up to a
per-row constant and ``softmax(log p / T) == softmax(logits / T)`` exactly:
temperature scaling needs only the probabilities.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

ECE_BINS = 15


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def nll(y: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def ece(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins (top-1 confidence,
    bins (0, 1/b], ..., ((b-1)/b, 1]): sum over bins of |accuracy - mean confidence|
    weighted by the bin's share of images."""
    y = np.asarray(y, int)
    probs = np.asarray(probs, np.float64)
    if len(y) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability_bins(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per-bin accuracy, mean confidence and count (for the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y, int)).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    acc, mean_conf, count = [], [], []
    for b in range(bins):
        sel = idx == b
        count.append(int(sel.sum()))
        acc.append(float(correct[sel].mean()) if sel.any() else None)
        mean_conf.append(float(conf[sel].mean()) if sel.any() else None)
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "accuracy": acc, "confidence": mean_conf,
            "count": count}


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of ``y`` (bounded search on log T)."""
    y = np.asarray(y, int)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on zero images")
    res = minimize_scalar(lambda lt: nll(y, apply_temperature(probs, np.exp(lt))), bounds=(np.log(0.05), np.log(20)),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def save_temperature(path: str | Path, temperature: float, fitted_on: str, n: int, ece_before: float,
                     ece_after: float) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"temperature": temperature, "fitted_on": fitted_on, "n": n,
                                "ece_before": ece_before, "ece_after": ece_after}, indent=2))
    return path


def load_temperature(path: str | Path) -> float:
    doc = json.loads(Path(path).read_text())
    t = float(doc["temperature"])
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"{path}: temperature {t} is not a positive number")
    return t

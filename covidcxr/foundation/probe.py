"""Linear probe on cached embeddings: multinomial logistic regression (softmax) with scikit-learn.

The standard frozen-encoder evaluation (DINOv2, RAD-DINO and MedSigLIP papers all report
it): features are standardised, then an L2-regularised softmax regression is fitted. On
cached embeddings a probe takes seconds, so label-fraction sweeps and regularisation
searches cost nothing next to one pass of the encoder; ``compare_probe_speed`` measures
exactly that (recompute every embedding vs. read them from the cache, plus the fit).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from covidcxr.errors import DataError


@dataclass
class ProbeResult:
    model: object                  # sklearn Pipeline(StandardScaler, LogisticRegression)
    classes: list
    train_seconds: float
    train_accuracy: float
    val_accuracy: float | None

    def predict_proba(self, X) -> np.ndarray:
        """``[N, K]`` softmax probabilities, columns in the order of ``classes``."""
        return self.model.predict_proba(np.asarray(X, np.float32))


def train_linear_probe(X, y, X_val=None, y_val=None, C: float = 1.0, max_iter: int = 2000,
                       seed: int = 0) -> ProbeResult:
    """Fit a softmax linear probe on embeddings ``X [N, D]`` with labels ``y``; ``C`` is the inverse L2
    strength. Validation accuracy when ``X_val``/``y_val`` are given."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = np.asarray(X, np.float32), np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise DataError(f"linear probe: embeddings {X.shape} and {len(y)} labels do not match.")
    if len(set(y.tolist())) < 2:
        raise DataError("linear probe: the training labels hold a single class; a probe needs at least two.")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    t0 = time.perf_counter()
    model.fit(X, y)
    seconds = time.perf_counter() - t0
    val = None if X_val is None else float(model.score(np.asarray(X_val, np.float32), np.asarray(y_val)))
    return ProbeResult(model, list(model.classes_), seconds, float(model.score(X, y)), val)


def compare_probe_speed(cache, keys: Sequence[str], y, enc_id: str, prep: str,
                        compute_fn: Callable[[list[int]], np.ndarray], batch_size: int = 64) -> dict:
    """Seconds to recompute all embeddings with ``compute_fn`` vs. to read them from ``cache`` (filled first if
    needed), and to fit the probe: ``{"recompute_seconds", "cached_seconds", "probe_seconds", "speedup"}``."""
    t0 = time.perf_counter()
    for start in range(0, len(keys), batch_size):
        compute_fn(list(range(start, min(start + batch_size, len(keys)))))
    recompute = time.perf_counter() - t0
    cache.get(keys, enc_id, prep, compute_fn, batch_size)  # fill what is missing
    t1 = time.perf_counter()
    X = cache.get(keys, enc_id, prep, compute_fn, batch_size)
    cached = time.perf_counter() - t1
    result = train_linear_probe(X, y)
    return {"recompute_seconds": recompute, "cached_seconds": cached, "probe_seconds": result.train_seconds,
            "speedup": recompute / max(cached, 1e-9), "train_accuracy": result.train_accuracy}

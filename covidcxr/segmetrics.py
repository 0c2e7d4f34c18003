"""Segmentation figures per image: Dice, IoU and the 95th-percentile Hausdorff distance."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def overlap_scores(t, p, xp=np):
    """The one implementation of thresholded Dice and IoU: per-image scores of binary masks ``t`` and ``p``
    given as 0/1 floats ``[B, pixels]``; both masks empty scores 1. ``xp``: NumPy, or ``keras.ops`` inside
    a Keras metric (``losses.MaskScore``)."""
    inter = xp.sum(t * p, axis=1)
    st, sp = xp.sum(t, axis=1), xp.sum(p, axis=1)
    union = st + sp - inter
    return (xp.where(st + sp > 0, 2.0 * inter / xp.maximum(st + sp, 1.0), 1.0),
            xp.where(union > 0, inter / xp.maximum(union, 1.0), 1.0))


def mask_scores(truth: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (Dice, IoU) of true masks (>= 0.5) and predicted probabilities (>= ``threshold``), [B, ...]."""
    t = (np.asarray(truth).reshape(len(truth), -1) >= 0.5).astype(np.float64)
    p = (np.asarray(probs).reshape(len(probs), -1) >= threshold).astype(np.float64)
    return overlap_scores(t, p)


def dice(t: np.ndarray, p: np.ndarray) -> float:
    return float(mask_scores(np.asarray(t, bool)[None], np.asarray(p, bool)[None])[0][0])


def iou(t: np.ndarray, p: np.ndarray) -> float:
    return float(mask_scores(np.asarray(t, bool)[None], np.asarray(p, bool)[None])[1][0])


def _surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, border_value=0)


def hd95(t: np.ndarray, p: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in pixels.
    0 when both masks are empty; NaN when exactly one is (undefined)."""
    t, p = t.astype(bool), p.astype(bool)
    if not t.any() and not p.any():
        return 0.0
    if not t.any() or not p.any():
        return float("nan")
    st, sp = _surface(t), _surface(p)
    dt_p = ndimage.distance_transform_edt(~sp)
    dt_t = ndimage.distance_transform_edt(~st)
    d = np.concatenate([dt_p[st], dt_t[sp]])
    return float(np.percentile(d, 95))


def segmentation_metrics(true_masks, pred_probs, labels=None, threshold: float = 0.5) -> dict:
    """Mean Dice, IoU and HD95 over images, overall and per class of image.
    ``true_masks``/``pred_probs``: [N, H, W] (or [..., 1]) arrays, or lists of per-image arrays
    whose sizes may differ from image to image (each pair must agree); ``labels``: class per image."""
    def binary(a, thr):
        a = np.asarray(a)
        return (a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a) >= thr

    pairs = [(binary(a, 0.5), binary(b, threshold)) for a, b in zip(true_masks, pred_probs)]
    for t, p in pairs:
        if t.shape != p.shape:
            raise ValueError(f"mask shapes differ: truth {t.shape}, prediction {p.shape}")
    rows = [(dice(t, p), iou(t, p), hd95(t, p)) for t, p in pairs]
    arr = np.array(rows, dtype=float).reshape(-1, 3)

    def summary(sel) -> dict:
        sub = arr[sel]
        h = sub[:, 2][np.isfinite(sub[:, 2])]
        return {"n": int(len(sub)), "dice": float(sub[:, 0].mean()) if len(sub) else None,
                "iou": float(sub[:, 1].mean()) if len(sub) else None,
                "hd95": float(h.mean()) if len(h) else None, "hd95_undefined": int(len(sub) - len(h))}

    out = summary(np.ones(len(arr), bool))
    out["per_image"] = {"dice": arr[:, 0].tolist(), "iou": arr[:, 1].tolist(), "hd95": arr[:, 2].tolist()}
    if labels is not None:
        labels = np.asarray(labels)
        out["per_class"] = {str(c): summary(labels == c) for c in sorted(set(labels.tolist()))}
    return out

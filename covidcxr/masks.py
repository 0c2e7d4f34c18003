"""Predicted masks as PNG files, and drawn over the X-ray (sizing: covidcxr.data.preprocess.mask_from_probs)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image
import numpy as np
from scipy import ndimage


def save_png(mask: np.ndarray, path: str | Path) -> Path:
    """Boolean mask -> 8-bit PNG with 0 and 255."""
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(path)
    return Path(path)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    mask = np.asarray(mask, bool)
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    return ndimage.binary_dilation(edge, iterations=max(0, width - 1)) if width > 1 else edge


def overlay(gray01: np.ndarray, pred: np.ndarray | None = None, truth: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 picture of the X-ray with the prediction tinted and outlined in red and the
    ground truth outlined in green (both masks at the image's size)."""
    gray = np.clip(np.asarray(gray01, np.float32), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    width = max(1, round(max(gray.shape) / 256))
    if pred is not None:
        pred = np.asarray(pred, bool)
        rgb[pred] = 0.75 * rgb[pred] + 0.25 * np.array([1.0, 0.2, 0.2])
        rgb[_outline(pred, width)] = (1.0, 0.1, 0.1)
    if truth is not None:
        rgb[_outline(truth, width)] = (0.1, 1.0, 0.1)
    return (rgb * 255 + 0.5).astype(np.uint8)

"""Segmentation losses and metrics (keras.ops only, any backend).

Losses return one value per image, so a per-image sample weight of 0 (an image
without a mask in a multi-task batch) removes that image from the mask loss
instead of teaching the model an empty mask.
"""
from __future__ import annotations

import keras
from keras import ops

from covidcxr.errors import ConfigError
from covidcxr.segmetrics import overlap_scores

SMOOTH = 1.0


def _flat(y_true, y_pred):
    y_true = ops.cast(ops.reshape(y_true, (ops.shape(y_true)[0], -1)), "float32")
    y_pred = ops.cast(ops.reshape(y_pred, (ops.shape(y_pred)[0], -1)), "float32")
    return y_true, y_pred


def soft_dice(y_true, y_pred, smooth: float = SMOOTH):
    """Per-image soft Dice (2|A.B| + s) / (|A| + |B| + s)."""
    t, p = _flat(y_true, y_pred)
    inter = ops.sum(t * p, axis=1)
    return (2.0 * inter + smooth) / (ops.sum(t, axis=1) + ops.sum(p, axis=1) + smooth)


@keras.saving.register_keras_serializable(package="covidcxr")
def dice_loss(y_true, y_pred):
    return 1.0 - soft_dice(y_true, y_pred)


@keras.saving.register_keras_serializable(package="covidcxr")
def bce_dice_loss(y_true, y_pred):
    t, p = _flat(y_true, y_pred)
    p = ops.clip(p, 1e-7, 1 - 1e-7)
    bce = -ops.mean(t * ops.log(p) + (1 - t) * ops.log(1 - p), axis=1)
    return bce + dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="covidcxr")
def focal_loss(y_true, y_pred, gamma: float = 2.0, alpha: float = 0.25):
    """Binary focal loss (Lin et al. 2017), mean over pixels per image."""
    t, p = _flat(y_true, y_pred)
    p = ops.clip(p, 1e-7, 1 - 1e-7)
    pt = t * p + (1 - t) * (1 - p)
    a = t * alpha + (1 - t) * (1 - alpha)
    return ops.mean(-a * (1 - pt) ** gamma * ops.log(pt), axis=1)


LOSSES = {"bce_dice": bce_dice_loss, "dice": dice_loss, "focal": focal_loss}


def get_loss(name: str):
    if name not in LOSSES:
        raise ConfigError(f"unknown segmentation loss '{name}'; choose from {', '.join(LOSSES)}")
    return LOSSES[name]


@keras.saving.register_keras_serializable(package="covidcxr")
class MaskScore(keras.metrics.Metric):
    """Mean per-image Dice or IoU of the thresholded mask, over images with weight > 0.
    An image whose true and predicted masks are both empty scores 1."""

    def __init__(self, kind: str = "dice", threshold: float = 0.5, name: str | None = None, **kw):
        super().__init__(name=name or kind, **kw)
        self.kind, self.threshold = kind, threshold
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t, p = _flat(y_true, y_pred)
        t = ops.cast(t >= 0.5, "float32")
        p = ops.cast(p >= self.threshold, "float32")
        dice, iou = overlap_scores(t, p, ops)
        score = dice if self.kind == "dice" else iou
        w = ops.ones_like(score) if sample_weight is None else ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        w = ops.cast(w > 0, "float32")
        self.total.assign_add(ops.sum(score * w))
        self.count.assign_add(ops.sum(w))

    def result(self):
        return ops.where(self.count > 0, self.total / ops.maximum(self.count, 1.0), 0.0)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "threshold": self.threshold}

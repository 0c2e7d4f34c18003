"""The model ``fit`` trains: augmentation + the network, one compiled step on any backend.

Batches are dicts ``{"image": uint8 [B, S, S, 1], "mask": uint8 [B, S, S, 1] (segmenting
tasks), "class_weight": [B], "mask_weight": [B]}`` with the one-hot labels as ``y``. In
training the ``Augment`` layer moves image and mask with one matrix inside the step; the
loss then sees the *augmented* mask as its target (``compute_loss``/``compute_metrics``
swap it in), so segmentation targets never leave the accelerator. Only ``net`` is saved:
it is the plain inference model, and the augmentation is not part of it.
"""
from __future__ import annotations

import keras


class Trainee(keras.Model):
    def __init__(self, net: keras.Model, augment: keras.layers.Layer, task, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.augment = augment
        self.task = task

    def call(self, inputs, training=False):
        mask = inputs.get("mask") if self.task.needs_mask else None
        image, mask = self.augment(inputs["image"], mask, training=training)
        out = self.net(image, training=training)
        return {"out": out, "aug_mask": mask} if mask is not None else {"out": out}

    def _swap(self, x, y, y_pred):
        return self.task.loss_inputs(x, y, y_pred["out"], y_pred.get("aug_mask"))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y_true, out, weights = self._swap(x, y, y_pred)
        return super().compute_loss(x=x, y=y_true, y_pred=out, sample_weight=weights, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_true, out, weights = self._swap(x, y, y_pred)
        return super().compute_metrics(x, y_true, out, sample_weight=weights)

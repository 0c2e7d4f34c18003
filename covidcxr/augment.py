"""Augmentation on the accelerator: a Keras layer in ``keras.ops`` only, run inside the
compiled training step on any backend.

One random affine per image (rotation, zoom, shift, optional horizontal flip) is applied
with the same matrix to the image and its mask (the mask stays binary), then brightness and
contrast change the image. Sampling is one bilinear gather per image (``take_along_axis``),
not Keras's stack of RandomRotation/RandomZoom/... (which on JAX goes through
``map_coordinates`` once per layer and is orders of magnitude slower). The layer is seeded
and is the identity at inference.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from covidcxr.config import AugmentConfig


def affine_matrices(size: int, angle, zoom_x, zoom_y, tx, ty, flip):
    """Per-image maps from output pixel (x, y) to input pixel: [B, 6] rows (a, b, c, d, e, f) with
    x_in = a x + b y + c, y_in = d x + e y + f; rotation about the centre, then zoom (> 1 enlarges),
    then a shift in pixels; ``flip`` is -1 (mirror) or 1. All arguments are [B] tensors."""
    cos, sin = ops.cos(angle), ops.sin(angle)
    a, b = cos * flip / zoom_x, -sin / zoom_y
    d, e = sin * flip / zoom_x, cos / zoom_y
    ctr = (size - 1.0) / 2.0
    c = ctr - a * ctr - b * ctr + tx
    f = ctr - d * ctr - e * ctr + ty
    return ops.stack([a, b, c, d, e, f], axis=1)


def sample_affine(images, matrices):
    """Bilinear resampling of float [B, S, S, C] by per-image matrices [B, 6]; outside is 0."""
    shape = ops.shape(images)
    bsz, size, chans = shape[0], images.shape[1], images.shape[-1]
    coords = ops.cast(ops.arange(size), "float32")
    gy, gx = ops.meshgrid(coords, coords, indexing="ij")
    gx, gy = ops.reshape(gx, (1, -1)), ops.reshape(gy, (1, -1))
    m = ops.cast(matrices, "float32")
    x = m[:, 0:1] * gx + m[:, 1:2] * gy + m[:, 2:3]
    y = m[:, 3:4] * gx + m[:, 4:5] * gy + m[:, 5:6]
    x0, y0 = ops.floor(x), ops.floor(y)
    flat = ops.reshape(images, (bsz, size * size, chans))
    out = 0.0
    for dy in (0.0, 1.0):
        for dx in (0.0, 1.0):
            xi, yi = x0 + dx, y0 + dy
            w = (1.0 - ops.abs(x - xi)) * (1.0 - ops.abs(y - yi))
            inside = (xi >= 0) & (xi <= size - 1) & (yi >= 0) & (yi <= size - 1)
            w = ops.where(inside, w, 0.0)
            idx = ops.cast(ops.clip(yi, 0, size - 1) * size + ops.clip(xi, 0, size - 1), "int32")
            vals = ops.take_along_axis(flat, ops.expand_dims(idx, -1), axis=1)
            out = out + vals * ops.expand_dims(w, -1)
    return ops.reshape(out, (bsz, size, size, chans))


@keras.saving.register_keras_serializable(package="covidcxr")
class Augment(keras.layers.Layer):
    """``(images [B, S, S, 1] 0..255, masks [B, S, S, 1] {0, 1} or None) -> (images, masks)``,
    float32, randomly transformed when ``training``; returned unchanged otherwise."""

    def __init__(self, rotation_deg=7.0, zoom=0.10, shift=0.05, hflip=False, brightness=0.10, contrast=0.15,
                 seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.cfg = AugmentConfig(rotation_deg, zoom, shift, hflip, brightness, contrast)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_config_object(cls, cfg: AugmentConfig, seed=None, **kwargs):
        return cls(cfg.rotation_deg, cfg.zoom, cfg.shift, cfg.hflip, cfg.brightness, cfg.contrast, seed, **kwargs)

    def call(self, images, masks=None, training=False):
        if not training or self.cfg.is_identity:
            return images, masks
        c = self.cfg
        images = ops.cast(images, "float32")
        bsz, size = ops.shape(images)[0], images.shape[1]
        u = keras.random.uniform((bsz, 7), -1.0, 1.0, seed=self.seed_generator)
        zoom = 1.0 + u[:, 1] * c.zoom
        flip = ops.where((u[:, 4] < 0.0) & c.hflip, -1.0, 1.0)
        mats = affine_matrices(size, u[:, 0] * (c.rotation_deg * math.pi / 180.0), zoom, zoom,
                               u[:, 2] * c.shift * size, u[:, 3] * c.shift * size, flip)
        both = images if masks is None else ops.concatenate([images, ops.cast(masks, "float32")], axis=-1)
        out = sample_affine(both, mats)
        images = out[..., :1]
        if masks is not None:
            masks = ops.cast(out[..., 1:] >= 0.5, "float32")
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        k = ops.reshape(1.0 + u[:, 5] * c.contrast, (-1, 1, 1, 1))
        shift = ops.reshape(u[:, 6] * (c.brightness * 255.0), (-1, 1, 1, 1))
        images = ops.clip((images - mean) * k + mean + shift, 0.0, 255.0)
        return images, masks

    def get_config(self):
        c = self.cfg
        return {**super().get_config(), "rotation_deg": c.rotation_deg, "zoom": c.zoom, "shift": c.shift,
                "hflip": c.hflip, "brightness": c.brightness, "contrast": c.contrast, "seed": self.seed}


def fixed_view(images, degrees: float = 0.0, zoom: float = 1.0):
    """One fixed rotation/zoom of a whole batch (test-time augmentation views)."""
    images = ops.cast(images, "float32")
    bsz, size = ops.shape(images)[0], images.shape[1]
    one = ops.ones((bsz,), "float32")
    mats = affine_matrices(size, one * (degrees * math.pi / 180.0), one * zoom, one * zoom, one * 0.0, one * 0.0, one)
    return sample_affine(images, mats)

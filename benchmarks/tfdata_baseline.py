"""The training input path as it was before covidcxr went backend-neutral, kept only as the
baseline the benchmarks compare against in the same run (it is not used by the package).

tf.data: read + decode + resize in ``map`` on the CPU, ``cache()`` in memory as uint8, shuffle,
batch, then per batch on the CPU: one random projective transform (TF's
ImageProjectiveTransformV3), brightness/contrast, per-backbone normalisation to three
channels, and ``model.fit`` on float32 RGB. Same settings as covidcxr's AugmentConfig defaults.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from covidcxr.config import AugmentConfig
from covidcxr.data import tfgraph as G
from covidcxr.models.layers import normalization_params

AUTOTUNE = tf.data.AUTOTUNE


def augment_batch(images, cfg: AugmentConfig):
    """The old per-batch CPU augmentation of float [B, S, S, 1] images in [0, 1]."""
    b = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    rnd = lambda lo, hi: tf.random.uniform([b], lo, hi)  # noqa: E731
    angle = rnd(-1.0, 1.0) * (cfg.rotation_deg * math.pi / 180.0)
    zoom = 1.0 + rnd(-1.0, 1.0) * cfg.zoom
    tx, ty = rnd(-1.0, 1.0) * cfg.shift * size, rnd(-1.0, 1.0) * cfg.shift * size
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    cx = cy = (size - 1.0) / 2.0
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy + tx, sin, cos, cy - sin * cx - cos * cy + ty,
                           tf.zeros([b]), tf.zeros([b])], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms,
                                                output_shape=tf.shape(images)[1:3], fill_value=0.0,
                                                interpolation="BILINEAR", fill_mode="CONSTANT")
    mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
    k = tf.reshape(1.0 + rnd(-1.0, 1.0) * cfg.contrast, [-1, 1, 1, 1])
    shift = tf.reshape(rnd(-1.0, 1.0) * cfg.brightness, [-1, 1, 1, 1])
    return tf.clip_by_value((out - mean) * k + mean + shift, 0.0, 1.0)


def normalize(img, mode: str):
    scale, mean, std = normalization_params(mode)
    rgb = tf.concat([img, img, img], axis=-1)
    return (rgb * scale - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def dataset(paths: list[str], labels: np.ndarray, n_classes: int, size: int, batch_size: int, normalization: str,
            training: bool = True, seed: int = 0):
    """(x float32 [B, S, S, 3], one-hot y) batches, as the old make_dataset built them."""
    ds = tf.data.Dataset.from_tensor_slices((np.array(paths, object), labels.astype(np.int32)))
    ds = ds.map(lambda p, y: (G.prepare(G.decode_bytes(tf.io.read_file(p)), size), y),
                num_parallel_calls=AUTOTUNE, deterministic=True).cache()
    if training:
        ds = ds.shuffle(min(len(paths), 4096), seed=seed, reshuffle_each_iteration=True)
    cfg = AugmentConfig()

    def finish(img, y):
        img = tf.cast(img, tf.float32) / 255.0
        if training:
            img = augment_batch(img, cfg)
        img = tf.ensure_shape(img, [None, size, size, 1])
        return normalize(img, normalization), tf.one_hot(y, n_classes)

    return ds.batch(batch_size).map(finish, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

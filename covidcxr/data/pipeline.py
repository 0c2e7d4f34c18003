"""tf.data input pipeline built from a manifest, as plain functions.

    load (read, decode, resize, contrast; mask aligned by nearest neighbour)
      -> skip unreadable files (logged, never fatal) -> cache (uint8)
      -> shuffle -> batch -> augment (image and mask together, vectorised)
      -> normalise for the backbone -> prefetch

Elements: ``(image, target, sample_weight)``. For ``task='classify'`` the
target is the one-hot label and the weight the class weight; for
``'segment'`` the target is the mask and the weight 1 where a mask exists,
0 where it does not; for ``'multitask'`` both, as dicts keyed ``label`` and
``mask``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import SIXTEEN_BIT_MODES, TF_DECODABLE, read_image, read_mask

AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class AugmentConfig:
    """Geometric and photometric augmentation; image and mask move together.

    Horizontal flips are off by default: they turn the heart to the right
    (dextrocardia), which never occurs in the data a model will see.
    """

    rotation_deg: float = 7.0
    zoom: float = 0.10
    shift: float = 0.05
    hflip: bool = False
    brightness: float = 0.10
    contrast: float = 0.15


def class_weights(labels, class_names: list[str]) -> dict[str, float]:
    """Balanced weights n / (k * n_c) from the training labels (missing classes -> 0)."""
    counts = pd.Series(list(labels)).value_counts()
    n, k = len(labels), len(class_names)
    return {c: (n / (k * counts[c]) if counts.get(c, 0) else 0.0) for c in class_names}


def _read_py(path: bytes) -> np.ndarray:
    return read_image(path.decode())[..., None].astype(np.float32)


def _read_mask_py(path: bytes, width: np.int32, height: np.int32) -> np.ndarray:
    return read_mask(path.decode(), (int(width), int(height)))[..., None].astype(np.float32)


def load_image(path: tf.Tensor, native: tf.Tensor, stretch: tf.Tensor) -> tf.Tensor:
    """Path -> float32 [H, W, 1] in [0, 1]; TF decoding where it can, Python (DICOM, TIFF) else."""
    def tf_path():
        return P.decode_bytes(tf.io.read_file(path), stretch)

    def py_path():
        img = tf.numpy_function(_read_py, [path], tf.float32, stateful=False)
        return tf.ensure_shape(img, [None, None, 1])

    return tf.cond(native, tf_path, py_path)


def load_mask(path: tf.Tensor, native: tf.Tensor, size: int) -> tf.Tensor:
    """Mask path (or '') -> float32 [size, size, 1] in {0, 1}, nearest-neighbour resized."""
    def tf_path():
        return P.decode_mask(tf.io.read_file(path))

    def py_path():
        m = tf.numpy_function(_read_mask_py, [path, size, size], tf.float32, stateful=False)
        return tf.ensure_shape(m, [None, None, 1])

    def read():
        m = tf.cond(native, tf_path, py_path)
        return tf.image.resize(m, (size, size), method="nearest")

    return tf.cond(tf.strings.length(path) > 0, read, lambda: tf.zeros([size, size, 1], tf.float32))


def _tables(df: pd.DataFrame, class_names: list[str], mask_column: str) -> dict[str, np.ndarray]:
    lookup = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(df["label"]) - set(lookup))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes {class_names}")
    paths = df["path"].astype(str).tolist()
    masks = df[mask_column].astype(str).tolist() if mask_column in df else [""] * len(df)
    modes = df["mode"].astype(str).tolist() if "mode" in df else [""] * len(df)
    return {
        "path": np.array(paths, dtype=object),
        "native": np.array([Path(p).suffix.lower() in TF_DECODABLE for p in paths]),
        "stretch": np.array([m in SIXTEEN_BIT_MODES for m in modes]),
        "mask": np.array(masks, dtype=object),
        "mask_native": np.array([Path(m).suffix.lower() in TF_DECODABLE for m in masks]),
        "label": np.array([lookup[c] for c in df["label"]], dtype=np.int32),
    }


def load_examples(df: pd.DataFrame, class_names: list[str], image_size: int, contrast: str = "none",
                  mask_column: str = "lung_mask") -> tf.data.Dataset:
    """Decoded, resized, contrast-enhanced uint8 examples, in manifest order, bad files skipped."""
    t = _tables(df, class_names, mask_column)
    ds = tf.data.Dataset.from_tensor_slices(t)

    def load(e):
        img = P.prepare(load_image(e["path"], e["native"], e["stretch"]), image_size, contrast)
        mask = load_mask(e["mask"], e["mask_native"], image_size)
        return {"image": img, "mask": tf.cast(mask, tf.uint8), "has_mask": tf.strings.length(e["mask"]) > 0,
                "label": e["label"], "path": e["path"]}

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    # One unreadable file must not end an epoch: it is logged and skipped.
    return ds.ignore_errors(log_warning=True)


def affine_batch(images: tf.Tensor, angle_rad: float, zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)):
    """One fixed affine transform for a whole batch [B, S, S, C] (test-time augmentation)."""
    b = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    cos, sin = math.cos(angle_rad) / zoom, math.sin(angle_rad) / zoom
    cx = cy = (size - 1.0) / 2.0
    tx, ty = shift[0] * size, shift[1] * size
    row = tf.stack([cos + 0 * size, -sin + 0 * size, cx - cos * cx + sin * cy + tx, sin + 0 * size, cos + 0 * size,
                    cy - sin * cx - cos * cy + ty, 0 * size, 0 * size])
    transforms = tf.tile(row[None], [b, 1])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


def augment_batch(images: tf.Tensor, masks: tf.Tensor | None, cfg: AugmentConfig, seed: int | None = None):
    """Random affine (rotation, zoom, shift, optional flip) applied identically to
    images and masks, then brightness/contrast on the images. Inputs float [B, S, S, 1];
    ``masks`` None (classification without masks) transforms the images alone."""
    b = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    rnd = lambda lo, hi: tf.random.uniform([b], lo, hi, seed=seed)  # noqa: E731
    angle = rnd(-1.0, 1.0) * (cfg.rotation_deg * math.pi / 180.0)
    zoom = 1.0 + rnd(-1.0, 1.0) * cfg.zoom
    tx, ty = rnd(-1.0, 1.0) * cfg.shift * size, rnd(-1.0, 1.0) * cfg.shift * size
    flip = tf.where(rnd(0.0, 1.0) < (0.5 if cfg.hflip else 0.0), -1.0, 1.0)
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # output (x, y) -> input: A @ ([x, y] - c) + c + t, with A = R(angle) F(flip) / zoom
    a, bb, c, d = cos * flip, -sin, sin * flip, cos
    cx = cy = (size - 1.0) / 2.0
    transforms = tf.stack([a, bb, cx - a * cx - bb * cy + tx, c, d, cy - c * cx - d * cy + ty,
                           tf.zeros([b]), tf.zeros([b])], axis=1)
    both = images if masks is None else tf.concat([images, masks], axis=-1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=both, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    images = out[..., :1]
    if masks is not None:
        masks = tf.cast(out[..., 1:] >= 0.5, tf.float32)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    k = tf.reshape(1.0 + rnd(-1.0, 1.0) * cfg.contrast, [-1, 1, 1, 1])
    shift = tf.reshape(rnd(-1.0, 1.0) * cfg.brightness, [-1, 1, 1, 1])
    images = tf.clip_by_value((images - mean) * k + mean + shift, 0.0, 1.0)
    return images, masks


def make_dataset(df: pd.DataFrame, class_names: list[str], *, image_size: int, normalization: str,
                 batch_size: int = 32, training: bool = False, task: str = "classify",
                 mask_column: str = "lung_mask", contrast: str = "none",
                 augment: AugmentConfig | None = None, weights: dict[str, float] | None = None,
                 cache: str | None = "memory", seed: int = 42, repeat: bool = False,
                 lung_crop: bool = False) -> tf.data.Dataset:
    """The full pipeline for one split. ``weights``: per-class sample weights (classification).
    ``lung_crop``: multiply the image by its lung mask (whole-image vs segmented-lung studies)."""
    ds = load_examples(df, class_names, image_size, contrast, mask_column)
    if cache == "memory":
        ds = ds.cache()
    elif cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        ds = ds.cache(str(cache))
    if training:
        ds = ds.shuffle(min(len(df), 4096), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=False)
    n_classes = len(class_names)
    wvec = tf.constant([float((weights or {}).get(c, 1.0)) for c in class_names], tf.float32)
    needs_mask = task != "classify" or bool(lung_crop)

    def finish(e):
        img = tf.cast(e["image"], tf.float32) / 255.0
        # A plain classifier never looks at the mask: do not pay for moving it.
        mask = tf.cast(e["mask"], tf.float32) if needs_mask else None
        if training and augment is not None:
            img, mask = augment_batch(img, mask, augment)
        # Static spatial shapes (the projective transform loses them): decoders need them to upsample.
        img = tf.ensure_shape(img, [None, image_size, image_size, 1])
        if lung_crop:
            img = img * mask
        x = P.normalize(img, normalization)
        onehot = tf.one_hot(e["label"], n_classes)
        cls_w = tf.gather(wvec, e["label"])
        if task == "classify":
            return x, onehot, cls_w
        mask = tf.ensure_shape(mask, [None, image_size, image_size, 1])
        mask_w = tf.cast(e["has_mask"], tf.float32)
        if task == "segment":
            return x, mask, mask_w
        return x, {"label": onehot, "mask": mask}, {"label": cls_w, "mask": mask_w}

    return ds.map(finish, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

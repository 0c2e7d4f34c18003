"""Plain TensorFlow preprocessing functions: decode, resize, contrast, normalise.

The same functions run in the tf.data pipeline and inside the exported
SavedModel's serving signature, so training and serving see identical pixels.
All contrast methods are pure TF ops (CLAHE included): no Python in the graph.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

CONTRAST_METHODS = ("none", "stretch", "clahe", "gamma")
NORMALIZATIONS = ("caffe", "torch", "clip", "tf", "raw255", "unit")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP image statistics
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def decode_bytes(data: tf.Tensor, stretch: bool | tf.Tensor = False) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF bytes (8/16-bit, L/LA/RGB/RGBA) -> float32 [H, W, 1] in [0, 1]."""
    img = tf.io.decode_image(data, channels=3, dtype=tf.float32, expand_animations=False)
    img = tf.image.rgb_to_grayscale(img)
    img.set_shape([None, None, 1])
    return tf.cond(tf.convert_to_tensor(stretch), lambda: minmax(img), lambda: img)


def minmax(img: tf.Tensor) -> tf.Tensor:
    lo, hi = tf.reduce_min(img), tf.reduce_max(img)
    return tf.where(hi > lo, (img - lo) / tf.maximum(hi - lo, 1e-8), tf.zeros_like(img))


def decode_mask(data: tf.Tensor) -> tf.Tensor:
    """Mask bytes (any mode; RGB reduced to gray) -> float32 [H, W, 1], thresholded to {0, 1}."""
    m = tf.io.decode_image(data, channels=1, dtype=tf.float32, expand_animations=False)
    m.set_shape([None, None, 1])
    return tf.cast(m >= 0.5, tf.float32)


def resize(img: tf.Tensor, size: int, method: str = "bilinear") -> tf.Tensor:
    out = tf.image.resize(img, (size, size), method=method, antialias=(method != "nearest"))
    return tf.clip_by_value(out, 0.0, 1.0)


def quantize(img: tf.Tensor) -> tf.Tensor:
    """[0, 1] float -> uint8, as stored in the pipeline cache."""
    return tf.cast(tf.round(tf.clip_by_value(img, 0.0, 1.0) * 255.0), tf.uint8)


def clahe(img: tf.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> tf.Tensor:
    """Contrast-limited adaptive histogram equalisation in TF ops.

    ``img`` float [H, W, 1] in [0, 1]; tiles x tiles contextual regions,
    histogram clipped at ``clip_limit`` times the uniform bin height with the
    excess redistributed, bilinear interpolation between tile mappings.
    """
    x = tf.cast(tf.round(img[..., 0] * 255.0), tf.int32)
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    th = (h + tiles - 1) // tiles
    tw = (w + tiles - 1) // tiles
    padded = tf.pad(x, [[0, th * tiles - h], [0, tw * tiles - w]], mode="SYMMETRIC")
    blocks = tf.reshape(padded, [tiles, th, tiles, tw])
    blocks = tf.reshape(tf.transpose(blocks, [0, 2, 1, 3]), [tiles * tiles, th * tw])
    hist = tf.cast(tf.math.bincount(blocks, minlength=256, maxlength=256, axis=-1), tf.float32)
    npix = tf.cast(th * tw, tf.float32)
    limit = tf.maximum(clip_limit * npix / 256.0, 1.0)
    excess = tf.reduce_sum(tf.nn.relu(hist - limit), axis=-1, keepdims=True)
    hist = tf.minimum(hist, limit) + excess / 256.0
    lut = tf.cumsum(hist, axis=-1) / npix  # [T*T, 256] in [0, 1]
    lut = tf.reshape(lut, [tiles, tiles, 256])

    def coords(n, t):
        f = (tf.cast(tf.range(n), tf.float32) + 0.5) / tf.cast(t, tf.float32) - 0.5
        i0 = tf.clip_by_value(tf.cast(tf.floor(f), tf.int32), 0, tiles - 1)
        i1 = tf.minimum(i0 + 1, tiles - 1)
        wgt = tf.clip_by_value(f - tf.cast(i0, tf.float32), 0.0, 1.0)
        return i0, i1, wgt

    y0, y1, wy = coords(h, th)
    x0, x1, wx = coords(w, tw)

    def sample(yi, xi):
        idx = tf.stack([tf.broadcast_to(yi[:, None], [h, w]), tf.broadcast_to(xi[None, :], [h, w]), x], axis=-1)
        return tf.gather_nd(lut, idx)

    wy, wx = wy[:, None], wx[None, :]
    out = ((1 - wy) * ((1 - wx) * sample(y0, x0) + wx * sample(y0, x1))
           + wy * ((1 - wx) * sample(y1, x0) + wx * sample(y1, x1)))
    return out[..., None]


def contrast(img: tf.Tensor, method: str = "none") -> tf.Tensor:
    """Contrast enhancement compared in the CXR literature (Rahman et al. 2021)."""
    if method == "none":
        return img
    if method == "stretch":  # 1st-99th percentile linear stretch
        flat = tf.sort(tf.reshape(img, [-1]))
        n = tf.shape(flat)[0]
        lo = flat[tf.cast(tf.cast(n - 1, tf.float32) * 0.01, tf.int32)]
        hi = flat[tf.cast(tf.cast(n - 1, tf.float32) * 0.99, tf.int32)]
        return tf.clip_by_value((img - lo) / tf.maximum(hi - lo, 1e-3), 0.0, 1.0)
    if method == "gamma":  # adaptive gamma: mean intensity -> 0.5
        mean = tf.clip_by_value(tf.reduce_mean(img), 0.05, 0.95)
        gamma = tf.math.log(0.5) / tf.math.log(mean)
        return tf.pow(tf.clip_by_value(img, 1e-6, 1.0), gamma)
    if method == "clahe":
        return clahe(img)
    raise ValueError(f"unknown contrast method {method!r}; choose from {CONTRAST_METHODS}")


def normalize(img: tf.Tensor, mode: str) -> tf.Tensor:
    """[..., H, W, 1] in [0, 1] -> [..., H, W, 3] as the backbone expects."""
    img = tf.cast(img, tf.float32)
    if img.shape[-1] == 1:
        img = tf.concat([img, img, img], axis=-1)
    if mode == "caffe":
        return img * 255.0 - tf.constant(_CAFFE_MEAN_BGR)
    if mode == "torch":
        return (img - tf.constant(_IMAGENET_MEAN)) / tf.constant(_IMAGENET_STD)
    if mode == "clip":
        return (img - tf.constant(_CLIP_MEAN)) / tf.constant(_CLIP_STD)
    if mode == "tf":
        return img * 2.0 - 1.0
    if mode == "raw255":
        return img * 255.0
    if mode == "unit":
        return img
    raise ValueError(f"unknown normalisation {mode!r}; choose from {NORMALIZATIONS}")


def prepare(img01: tf.Tensor, image_size: int, contrast_method: str = "none") -> tf.Tensor:
    """Decoded [H, W, 1] image -> the uint8 [S, S, 1] the pipeline caches."""
    return quantize(contrast(resize(img01, image_size), contrast_method))


def serve_image(data: tf.Tensor, image_size: int, contrast_method: str, norm: str) -> tf.Tensor:
    """Encoded bytes -> model input, exactly as in evaluation (no augmentation)."""
    cached = prepare(decode_bytes(data), image_size, contrast_method)
    return normalize(tf.cast(cached, tf.float32) / 255.0, norm)


def numpy_to_png_bytes(gray01: np.ndarray) -> bytes:
    """float [H, W] in [0, 1] -> 16-bit grayscale PNG bytes (lossless for DICOM input)."""
    import io

    from PIL import Image

    arr = (np.clip(gray01, 0, 1) * 65535 + 0.5).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

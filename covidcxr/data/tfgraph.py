"""The host preprocessing (covidcxr/data/preprocess.py) in TensorFlow ops, for the SavedModel.

The serving signature takes encoded image bytes, so decoding, resizing and contrast must
run inside the graph. Every function here mirrors its NumPy twin; tests check that both
give the same uint8 pixels for the same file. Only export and serving import this module.
"""
from __future__ import annotations

import tensorflow as tf

from covidcxr.data.preprocess import RGB_WEIGHTS

_PNG_MAGIC = b"\x89PNG"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _to_gray(img: tf.Tensor) -> tf.Tensor:
    """float [H, W, C] (C = 1..4) -> [H, W, 1]: gray as is, gray+alpha -> gray, RGB(A) -> luma."""
    c = tf.shape(img)[-1]
    luma = lambda: tf.tensordot(img[..., :3], tf.constant(RGB_WEIGHTS), [[-1], [0]])[..., None]  # noqa: E731
    out = tf.cond(c >= 3, luma, lambda: img[..., :1])
    out.set_shape([None, None, 1])
    return out


def _png_bit_depth(data: tf.Tensor) -> tf.Tensor:
    """The PNG header's bit depth (byte 24 of the file), 0 for anything that is not a PNG."""
    is_png = tf.equal(tf.strings.substr(data, 0, 4), _PNG_MAGIC)
    depth = tf.io.decode_raw(tf.strings.substr(data, 24, 1), tf.uint8)[0]
    return tf.where(is_png, tf.cast(depth, tf.int32), 0)


def _scale_by_bit_depth(raw: tf.Tensor) -> tf.Tensor:
    """As preprocess.scale_by_bit_depth: / (2^bits - 1), bits the smallest in 8..16 holding the peak."""
    peak = tf.reduce_max(raw)
    pow2 = tf.constant([float(1 << k) for k in range(8, 16)], tf.float32)
    bits = 8 + tf.reduce_sum(tf.cast(peak >= pow2, tf.int32))
    return raw / (tf.cast(tf.bitwise.left_shift(1, bits), tf.float32) - 1.0)


def decode_bytes(data: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF bytes (8/16-bit, L/LA/RGB/RGBA/palette) -> float32 [H, W, 1] in [0, 1]."""
    def sixteen():
        raw = tf.cast(tf.io.decode_png(data, channels=0, dtype=tf.uint16), tf.float32)
        return _scale_by_bit_depth(raw)

    def eight():
        img = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
        return tf.cast(img, tf.float32) / 255.0

    def jpeg():  # the accurate integer IDCT is what Pillow (libjpeg's default) uses: same pixels
        return tf.cast(tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE"), tf.float32) / 255.0

    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), _JPEG_MAGIC)
    img = tf.cond(tf.equal(_png_bit_depth(data), 16), sixteen, lambda: tf.cond(is_jpeg, jpeg, eight))
    img.set_shape([None, None, None])
    return _to_gray(img)


def decode_mask(data: tf.Tensor) -> tf.Tensor:
    """Mask bytes (any mode) -> float32 [H, W, 1] in {0, 1}, thresholded at half range."""
    return tf.cast(decode_bytes(data) >= 0.5, tf.float32)


def resize(img: tf.Tensor, size: int) -> tf.Tensor:
    out = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
    return tf.clip_by_value(out, 0.0, 1.0)


def resize_mask(mask: tf.Tensor, size: int) -> tf.Tensor:
    return tf.image.resize(mask, (size, size), method="nearest")


def mask_from_probs(probs: tf.Tensor, size) -> tf.Tensor:
    """[B, h, w, 1] probabilities -> [B, H, W, 1] float {0, 1} (antialiased bilinear, then 0.5)."""
    size = (size, size) if isinstance(size, int) else size
    return tf.cast(tf.image.resize(probs, size, method="bilinear", antialias=True) >= 0.5, tf.float32)


def quantize(img: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(tf.clip_by_value(img, 0.0, 1.0) * 255.0), tf.uint8)


def clahe(img: tf.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> tf.Tensor:
    """Contrast-limited adaptive histogram equalisation of float [H, W, 1] in [0, 1] (see preprocess.clahe)."""
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
    lut = tf.reshape(tf.cumsum(hist, axis=-1) / npix, [tiles, tiles, 256])

    def coords(n, t):
        f = (tf.cast(tf.range(n), tf.float32) + 0.5) / tf.cast(t, tf.float32) - 0.5
        i0 = tf.clip_by_value(tf.cast(tf.floor(f), tf.int32), 0, tiles - 1)
        return i0, tf.minimum(i0 + 1, tiles - 1), tf.clip_by_value(f - tf.cast(i0, tf.float32), 0.0, 1.0)

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
    if method == "none":
        return img
    if method == "stretch":
        flat = tf.sort(tf.reshape(img, [-1]))
        n = tf.cast(tf.shape(flat)[0] - 1, tf.float32)
        lo = flat[tf.cast(n * 0.01, tf.int32)]
        hi = flat[tf.cast(n * 0.99, tf.int32)]
        return tf.clip_by_value((img - lo) / tf.maximum(hi - lo, 1e-3), 0.0, 1.0)
    if method == "gamma":
        mean = tf.clip_by_value(tf.reduce_mean(img), 0.05, 0.95)
        return tf.pow(tf.clip_by_value(img, 1e-6, 1.0), tf.math.log(0.5) / tf.math.log(mean))
    if method == "clahe":
        return clahe(img)
    raise ValueError(f"unknown contrast method {method!r}")


def prepare(img01: tf.Tensor, image_size: int, contrast_method: str = "none") -> tf.Tensor:
    """Decoded [H, W, 1] -> uint8 [S, S, 1], as preprocess.prepare."""
    return quantize(contrast(resize(img01, image_size), contrast_method))


def serve_image(data: tf.Tensor, image_size: int, contrast_method: str) -> tf.Tensor:
    """Encoded bytes -> the model's float32 [S, S, 1] uint8-range input (no augmentation)."""
    return tf.cast(prepare(decode_bytes(data), image_size, contrast_method), tf.float32)

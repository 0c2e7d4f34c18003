"""The host preprocessing (covidcxr/data/preprocess.py) in TensorFlow ops, for the SavedModel.

The serving signature takes encoded image bytes, so decoding, resizing and contrast must
run inside the graph. Every function here is the twin of a NumPy one and computes the same
integers (covidcxr/data/resample.py says why that makes them identical): the uint8 pixels a
served model sees are the pixels it was trained on, for every file. Only export and serving
import this module.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from covidcxr.data import resample as R
from covidcxr.data.preprocess import (CLAHE_CLIP, CLAHE_TILES, GAMMA_FLOOR, LUMA, STRETCH_MIN_RANGE,
                                      clahe_limit, mask_threshold_g16)

_PNG_MAGIC = b"\x89PNG"
MASK_THRESHOLD = mask_threshold_g16()   # half range on the 16-bit grid
# Graph-building code with no Python control flow on tensors: AutoGraph must not rewrite it (it
# has been seen to resolve a call to the wrong function of covidcxr.data.preprocess).
_plain = tf.autograph.experimental.do_not_convert
_JPEG_MAGIC = b"\xff\xd8\xff"


def _png_header_byte(data: tf.Tensor, offset: int) -> tf.Tensor:
    """Byte ``offset`` of a PNG file (24: bit depth, 25: colour type), -1 for anything not a PNG."""
    is_png = tf.equal(tf.strings.substr(data, 0, 4), _PNG_MAGIC)
    value = tf.io.decode_raw(tf.strings.substr(data, offset, 1), tf.uint8)[0]
    return tf.where(is_png, tf.cast(value, tf.int32), -1)


def _sixteen_to_g16(raw: tf.Tensor) -> tf.Tensor:
    """As preprocess.sixteen_to_g16: round(raw * 65535 / (2^bits - 1)) in integers."""
    raw = tf.cast(raw, tf.int64)
    peak = tf.reduce_max(raw)
    pow2 = tf.constant([1 << k for k in range(8, 16)], tf.int64)
    bits = 8 + tf.reduce_sum(tf.cast(peak >= pow2, tf.int64))
    top = tf.bitwise.left_shift(tf.constant(1, tf.int64), bits) - 1
    return (raw * (2 * R.G16_MAX) + top) // (2 * top)


def _u8_to_g16(img: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, C] -> int64 [H, W, 1]: gray as is, gray+alpha -> gray, RGB(A) -> Pillow's luma."""
    c = tf.cast(img, tf.int64)

    def luma():
        return (c[..., :1] * LUMA[0] + c[..., 1:2] * LUMA[1] + c[..., 2:3] * LUMA[2] + 0x8000) // 65536

    out = tf.cond(tf.shape(c)[-1] >= 3, luma, lambda: c[..., :1]) * 257
    out.set_shape([None, None, 1])
    return out


@_plain
def decode_g16(data: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF bytes -> int64 [H, W, 1] on the 16-bit grid (as imageio.read_image).

    16-bit gray PNGs by their bit depth; 16-bit colour PNGs by their high bytes (as Pillow reads
    them); JPEG with the accurate integer IDCT (Pillow's, libjpeg's default)."""
    def sixteen():
        return _sixteen_to_g16(tf.io.decode_png(data, channels=0, dtype=tf.uint16))

    def eight():
        return _u8_to_g16(tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False))

    def jpeg():
        return _u8_to_g16(tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE"))

    gray16 = tf.logical_and(tf.equal(_png_header_byte(data, 24), 16), tf.equal(_png_header_byte(data, 25), 0))
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), _JPEG_MAGIC)
    img = tf.cond(gray16, sixteen, lambda: tf.cond(is_jpeg, jpeg, eight))
    img.set_shape([None, None, 1])
    return img


@_plain
def decode_bytes(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> float32 [H, W, 1] in [0, 1] (g16 / 65535 in float32, as imageio.read_image)."""
    return tf.cast(decode_g16(data), tf.float32) / float(R.G16_MAX)


@_plain
def to_g16(img01: tf.Tensor) -> tf.Tensor:
    """float in [0, 1] -> int64 on the 16-bit grid: floor(x * 65535 + 0.5), exact in float64 (as preprocess.float_to_g16)."""
    x = tf.clip_by_value(tf.cast(img01, tf.float64) * float(R.G16_MAX), 0.0, float(R.G16_MAX))
    return tf.cast(tf.floor(x + 0.5), tf.int64)


@_plain
def decode_mask(data: tf.Tensor) -> tf.Tensor:
    """Mask bytes (any mode) -> float32 [H, W, 1] in {0, 1}, thresholded at half range."""
    return tf.cast(decode_g16(data) >= MASK_THRESHOLD, tf.float32)


def _weights(n_in: tf.Tensor, n_out) -> tf.Tensor:
    """As resample.fixed_point(resample.tap_numerators(n_in, n_out)): float64 [n_out, n_in]."""
    n_in, n_out = tf.cast(n_in, tf.int64), tf.cast(n_out, tf.int64)
    m = tf.maximum(n_in, n_out)
    x = tf.range(n_in, dtype=tf.int64)[None, :]
    j = tf.range(n_out, dtype=tf.int64)[:, None]
    num = tf.maximum(tf.constant(0, tf.int64), 2 * m - tf.abs((2 * x + 1) * n_out - (2 * j + 1) * n_in))
    w = tf.bitwise.left_shift(num, R.WEIGHT_BITS) // tf.reduce_sum(num, axis=1, keepdims=True)
    rest = R.ONE - tf.reduce_sum(w, axis=1, keepdims=True)
    is_max = tf.equal(num, tf.reduce_max(num, axis=1, keepdims=True))
    first_max = tf.reduce_min(tf.where(is_max, x, n_in), axis=1, keepdims=True)   # ties: the first
    w += tf.where(tf.equal(x, first_max), rest, tf.zeros_like(rest))
    return tf.cast(w, tf.float64)


def _apply(w: tf.Tensor, src: tf.Tensor) -> tf.Tensor:
    """Sparse [n_out, n_in] weights @ [n_in, k]: exact (integer-valued float64), cost ~ the taps."""
    return tf.sparse.sparse_dense_matmul(tf.sparse.from_dense(w), src)


@_plain
def resize_g16(g16: tf.Tensor, height, width=None) -> tf.Tensor:
    """int [H, W, 1] on the 16-bit grid -> int64 [height, width, 1] (as resample.resize_g16)."""
    width = height if width is None else width
    src = tf.cast(g16[..., 0], tf.float64)
    h, w = tf.shape(src)[0], tf.shape(src)[1]
    tmp = _apply(_weights(w, width), tf.transpose(src))            # [width, H]
    acc = _apply(_weights(h, height), tf.transpose(tmp))            # [height, width]
    out = tf.cast(tf.floor((acc + R.HALF_OUT) / R.OUT_SHIFT), tf.int64)
    return out[..., None]


@_plain
def resize(img: tf.Tensor, size: int) -> tf.Tensor:
    """float [H, W, 1] in [0, 1] -> float32 [size, size, 1] (the exact resize)."""
    return tf.cast(resize_g16(to_g16(img), size), tf.float32) / float(R.G16_MAX)


def _nearest(n_in: tf.Tensor, n_out) -> tf.Tensor:
    n_in, n_out = tf.cast(n_in, tf.int64), tf.cast(n_out, tf.int64)
    return ((2 * tf.range(n_out, dtype=tf.int64) + 1) * n_in) // (2 * n_out)


@_plain
def resize_mask(mask: tf.Tensor, size: int) -> tf.Tensor:
    """{0, 1} [H, W, 1] -> [size, size, 1], nearest neighbour (as preprocess.resize_mask)."""
    rows = tf.gather(mask, _nearest(tf.shape(mask)[0], size), axis=0)
    return tf.gather(rows, _nearest(tf.shape(mask)[1], size), axis=1)


@_plain
def mask_from_probs(probs: tf.Tensor, size) -> tf.Tensor:
    """[B, h, w, 1] probabilities -> [B, H, W, 1] float {0, 1}: the exact resize on the 16-bit
    grid, then 0.5 (as preprocess.mask_from_probs). ``size``: an int or [H, W]."""
    height, width = (size, size) if isinstance(size, int) else (size[0], size[1])

    def one(p):
        return tf.cast(resize_g16(to_g16(p), height, width) >= MASK_THRESHOLD, tf.float32)

    return tf.map_fn(one, tf.cast(probs, tf.float32))


def _g16_to_u8(g16: tf.Tensor) -> tf.Tensor:
    return tf.cast((2 * g16 + 257) // 514, tf.uint8)


def _rational_to_u8(num: tf.Tensor, den) -> tf.Tensor:
    return tf.cast((510 * num + den) // (2 * den), tf.uint8)


def _stretch(g16: tf.Tensor) -> tf.Tensor:
    flat = tf.sort(tf.reshape(g16, [-1]))
    n = tf.shape(flat, out_type=tf.int64)[0] - 1
    lo, hi = flat[n // 100], flat[n * 99 // 100]
    span = tf.maximum(hi - lo, STRETCH_MIN_RANGE)
    return _rational_to_u8(tf.clip_by_value(g16 - lo, 0, span), span)


def _gamma(g16: tf.Tensor) -> tf.Tensor:
    g = _gamma_exponent(tf.reduce_sum(g16), tf.size(g16, out_type=tf.int64))
    x = tf.maximum(tf.cast(g16, tf.float64) / R.G16_MAX, GAMMA_FLOOR)
    return tf.cast(tf.math.rint(255.0 * tf.pow(x, g)), tf.uint8)


def _gamma_exponent(total: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """As preprocess.gamma_exponent, in float64."""
    mean = tf.cast(total, tf.float64) / (tf.cast(count, tf.float64) * R.G16_MAX)
    mean = tf.clip_by_value(mean, 0.05, 0.95)
    return tf.constant(np.log(0.5), tf.float64) / tf.math.log(mean)


@_plain
def clahe(g16: tf.Tensor, size: int, clip_limit: float = CLAHE_CLIP, tiles: int = CLAHE_TILES) -> tf.Tensor:
    """As preprocess.clahe, for a [size, size, 1] image on the 16-bit grid (the tile geometry
    depends on the size only, so it is computed once, in NumPy, when the graph is traced)."""
    x = tf.cast(_g16_to_u8(g16[..., 0]), tf.int32)
    t, i0, i1, wi = R.clahe_grid(size, tiles)
    padded = tf.pad(x, [[0, t * tiles - size], [0, t * tiles - size]], mode="SYMMETRIC")
    blocks = tf.reshape(tf.transpose(tf.reshape(padded, [tiles, t, tiles, t]), [0, 2, 1, 3]), [tiles * tiles, t * t])
    hist = tf.bitwise.left_shift(tf.cast(tf.math.bincount(blocks, minlength=256, maxlength=256, axis=-1), tf.int64), 15)
    limit = clahe_limit(t * t, clip_limit)
    excess = tf.reduce_sum(tf.maximum(hist - limit, 0), axis=-1, keepdims=True)
    lut = tf.cumsum(tf.minimum(hist, limit) + excess // 256, axis=-1)      # [tiles * tiles, 256]
    flat, level = tf.reshape(lut, [-1]), tf.cast(x, tf.int64)

    def sample(yi, xi):  # lut[yi[row], xi[col], level]
        return tf.gather(flat, (tf.constant(yi)[:, None] * tiles + tf.constant(xi)[None, :]) * 256 + level)

    wy, wx = tf.constant(wi[:, None]), tf.constant(wi[None, :])
    two = 2 * t
    num = ((two - wy) * ((two - wx) * sample(i0, i0) + wx * sample(i0, i1))
           + wy * ((two - wx) * sample(i1, i0) + wx * sample(i1, i1)))
    return _rational_to_u8(num, 4 * t * t * ((t * t) << 15))[..., None]


@_plain
def contrast_g16(g16: tf.Tensor, size: int, method: str = "none") -> tf.Tensor:
    """[size, size, 1] on the 16-bit grid -> uint8 (as preprocess.contrast_g16)."""
    if method == "none":
        return _g16_to_u8(g16)
    if method == "stretch":
        return _stretch(g16)
    if method == "gamma":
        return _gamma(g16)
    if method == "clahe":
        return clahe(g16, size)
    raise ValueError(f"unknown contrast method {method!r}")


@_plain
def prepare(img01: tf.Tensor, image_size: int, contrast_method: str = "none") -> tf.Tensor:
    """Decoded [H, W, 1] (float in [0, 1]) -> uint8 [S, S, 1], as preprocess.prepare."""
    return contrast_g16(resize_g16(to_g16(img01), image_size), image_size, contrast_method)


@_plain
def prepare_bytes(data: tf.Tensor, image_size: int, contrast_method: str = "none") -> tf.Tensor:
    """Encoded bytes -> uint8 [S, S, 1] (decode_g16, then prepare's steps on the integers)."""
    return contrast_g16(resize_g16(decode_g16(data), image_size), image_size, contrast_method)

"""Exact resampling: the integer arithmetic that makes the host and the SavedModel agree to the pixel.

Decoded images live on a 16-bit grid (``g16`` in 0..65535; an 8-bit value ``v`` is ``257 v``).
Resizing is an antialiased bilinear (triangle) filter, widened by the downscale factor, pixel
centres at +0.5, taps outside the image dropped and the rest renormalised: the filter of
``PIL.Image.resize(BILINEAR)`` and ``tf.image.resize(antialias=True)``. What is new is how it is
computed. The weight of input pixel ``x`` for output pixel ``j`` (``n_in`` -> ``n_out``) is the
integer

    n(j, x) = max(0, 2M - |(2x + 1) n_out - (2j + 1) n_in|),   M = max(n_in, n_out),

quantised to ``WEIGHT_BITS`` fixed-point bits with an exact integer sum (the remainder goes to the
first largest tap). Both passes then multiply integers by integers: every product and partial sum
is an integer below 2^53, so float64 sums are exact in any order (BLAS, sparse, XLA, Eigen), and
the one rounding at the end is integer arithmetic. ``tfgraph.py`` computes the same integers in
TensorFlow ops; nothing in either depends on a library's float rounding or summation order.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import sparse

G16_MAX = 65535
WEIGHT_BITS = 16
ONE = 1 << WEIGHT_BITS            # the fixed-point 1.0 of a weight
HALF_OUT = 1 << (2 * WEIGHT_BITS - 1)
OUT_SHIFT = float(1 << (2 * WEIGHT_BITS))


def tap_numerators(n_in: int, n_out: int) -> np.ndarray:
    """int64 [n_out, n_in] triangle-filter numerators n(j, x) (mostly zero)."""
    m = max(n_in, n_out)
    x = np.arange(n_in, dtype=np.int64)[None, :]
    j = np.arange(n_out, dtype=np.int64)[:, None]
    return np.maximum(0, 2 * m - np.abs((2 * x + 1) * n_out - (2 * j + 1) * n_in))


def fixed_point(num: np.ndarray) -> np.ndarray:
    """Numerators [n_out, n_in] -> int64 weights summing to exactly ONE per row: floor of the
    normalised weight, the remainder added to the first of the largest taps."""
    total = num.sum(axis=1, keepdims=True)
    w = (num << WEIGHT_BITS) // total
    rest = ONE - w.sum(axis=1)
    first_max = np.argmax(num, axis=1)          # numpy: the first of equal maxima
    w[np.arange(num.shape[0]), first_max] += rest
    return w


@functools.lru_cache(maxsize=128)
def weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """The [n_out, n_in] fixed-point resampling matrix as float64 (integer values), sparse: its
    product with a C-contiguous image costs about one multiply-add per tap and pixel."""
    return sparse.csr_matrix(fixed_point(tap_numerators(n_in, n_out)).astype(np.float64))


def resize_g16(g16: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """[H, W] on the 16-bit grid (integer values, any dtype) -> float64 integer values [height,
    width] on the same grid (round half up). Integer-valued float64 keeps the arithmetic exact and
    is what the contrast step wants next."""
    width = height if width is None else width
    src = np.asarray(g16, np.float64)
    h, w = src.shape
    if (h, w) == (height, width):
        return src.copy()
    tmp = weights(h, height) @ src if h != height else src * ONE            # rows first: contiguous
    acc_t = weights(w, width) @ np.ascontiguousarray(tmp.T) if w != width else tmp.T * ONE  # [width, height]
    acc_t += HALF_OUT                          # in place, on contiguous memory
    acc_t *= 1.0 / OUT_SHIFT                   # a power of two: exact
    return np.floor(acc_t, out=acc_t).T


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-neighbour source index of each output pixel (centres at +0.5), in integers."""
    return ((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in) // (2 * n_out)


def g16_to_u8(g16: np.ndarray, scratch: bool = False) -> np.ndarray:
    """16-bit grid -> uint8: floor((2 v + 257) / 514), i.e. v / 257 rounded half up (never exactly
    half-way). In float64 this floor is exact: a quotient that is not an integer is at least 1/514
    away from one, far beyond the division's rounding. ``scratch``: ``g16`` is a float64 array
    this call may overwrite (saves a copy)."""
    y = g16 if scratch and isinstance(g16, np.ndarray) and g16.dtype == np.float64 else np.array(g16, np.float64)
    y *= 2.0
    y += 257.0
    y /= 514.0
    return np.floor(y, out=y).astype(np.uint8)


def rational_to_u8(num: np.ndarray, den) -> np.ndarray:
    """uint8 of 255 * num / den (0 <= num <= den), round half up, in integers."""
    num = np.asarray(num, np.int64)
    return ((510 * num + den) // (2 * den)).astype(np.uint8)


def clahe_grid(n: int, tiles: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """CLAHE's tile geometry along one axis of ``n`` pixels: tile length t, and per pixel the two
    neighbouring tile indices and the weight of the second in units of 1/(2t) (exact integers)."""
    t = -(-n // tiles)
    f = 2 * np.arange(n, dtype=np.int64) + 1 - t          # (i + 0.5) / t - 0.5, times 2t
    i0 = np.clip(np.floor_divide(f, 2 * t), 0, tiles - 1)
    w1 = np.clip(f - 2 * t * i0, 0, 2 * t)
    return t, i0, np.minimum(i0 + 1, tiles - 1), w1

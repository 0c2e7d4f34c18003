"""Host-side preprocessing in NumPy/Pillow: decode, resize, contrast, quantise.

This is what the input cache stores and what prediction feeds a model, on every Keras
backend (no TensorFlow here). ``covidcxr/data/tfgraph.py`` is the same sequence in
TensorFlow ops for the SavedModel's serving signature; the two give identical uint8 pixels
(tests/test_preprocess.py on generated files of every mode and size, and on every real file
of ../shared/data), because every step after decoding is integer arithmetic
(``covidcxr/data/resample.py``):

    decode (gray on a 16-bit grid: g16 = 257 * 8-bit value; 16-bit by its real bit depth;
            RGB by Pillow's integer ITU-R 601 luma), carried as float32 g16 / 65535
      -> resize (antialiased bilinear, fixed-point weights, exact sums) -> 16-bit grid
      -> contrast (none | stretch | clahe | gamma) and quantise to uint8 (integer rounding;
         gamma's power is the one float step, in float64)
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from covidcxr.data import resample as R

CONTRAST_METHODS = ("none", "stretch", "clahe", "gamma")
LUMA = (19595, 38470, 7471)   # Pillow's convert("L"): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
_POW2 = np.array([1 << k for k in range(8, 16)], np.int64)   # 256 .. 32768
STRETCH_MIN_RANGE = 66        # 1e-3 of the 16-bit range: a flat image is not blown up
GAMMA_FLOOR = 1e-6
CLAHE_CLIP, CLAHE_TILES = 2.0, 8


def bit_depth(max_value: float) -> int:
    """Smallest bit depth (8..16) that holds ``max_value``: how a 10/12/14/16-bit radiograph
    stored in a 16-bit container is scaled, so 8- and 16-bit copies of a film agree."""
    return 8 + int(np.sum(int(max_value) >= _POW2))


def sixteen_to_g16(raw: np.ndarray) -> np.ndarray:
    """Integer pixel values of a 16-bit container -> the 16-bit grid by their real bit depth:
    round(raw * 65535 / (2^bits - 1)), half up, in integers."""
    raw = np.clip(np.asarray(raw, np.int64), 0, R.G16_MAX)
    top = (1 << bit_depth(raw.max() if raw.size else 0)) - 1
    return (raw * (2 * R.G16_MAX) + top) // (2 * top)


def luma_u8(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3+] -> int64 [H, W]: Pillow's integer ITU-R 601 luma (alpha ignored)."""
    c = np.asarray(rgb, np.int64)
    return (c[..., 0] * LUMA[0] + c[..., 1] * LUMA[1] + c[..., 2] * LUMA[2] + 0x8000) >> 16


def gray_u8(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W] (gray), [H, W, 2] (gray + alpha) or [H, W, 3|4] (RGB(A)) -> 8-bit gray [H, W]."""
    arr = np.asarray(arr)
    return arr if arr.ndim == 2 else (arr[..., 0] if arr.shape[-1] < 3 else luma_u8(arr))


def u8_to_float(arr: np.ndarray) -> np.ndarray:
    """8-bit image -> the decoded float32 [H, W]: v / 255 in float32, the same correctly rounded
    value as g16_to_float(257 v) (the two divide the same number), without the 16-bit detour."""
    return np.asarray(gray_u8(arr), np.float32) / np.float32(255.0)


def g16_to_float(g16: np.ndarray) -> np.ndarray:
    """The decoded image as callers see it: float32 [H, W] in [0, 1], g16 / 65535 in float32
    (correctly rounded, so lossless: ``float_to_g16`` gives g16 back)."""
    return np.asarray(g16, np.float32) / np.float32(R.G16_MAX)


def float_to_g16(img01: np.ndarray) -> np.ndarray:
    """float [H, W] in [0, 1] -> float64 integer values on the 16-bit grid: floor(x * 65535 + 0.5),
    computed exactly (a float32 times 65535 is exact in float64); exact for ``g16_to_float``
    output, and what tfgraph.to_g16 computes."""
    x = np.asarray(img01, np.float64) * float(R.G16_MAX)
    np.clip(x, 0.0, float(R.G16_MAX), out=x)
    x += 0.5
    return np.floor(x, out=x)


def resize(img01: np.ndarray, size: int) -> np.ndarray:
    """[H, W] float in [0, 1] -> [size, size] float32 in [0, 1] (the exact resize, on the 16-bit grid)."""
    return g16_to_float(R.resize_g16(float_to_g16(img01), size))


def _stretch(g16: np.ndarray) -> np.ndarray:
    """1st-99th percentile linear stretch, in integers."""
    flat = np.sort(g16, axis=None)
    n = flat.size - 1
    lo, hi = int(flat[n // 100]), int(flat[n * 99 // 100])
    span = max(hi - lo, STRETCH_MIN_RANGE)
    return R.rational_to_u8(np.clip(g16 - lo, 0, span), span)


def gamma_exponent(total: int, count: int) -> float:
    """Adaptive gamma: the exponent that takes the mean intensity (clipped to [0.05, 0.95]) to 0.5."""
    mean = min(max(total / (count * R.G16_MAX), 0.05), 0.95)
    return math.log(0.5) / math.log(mean)


def _gamma(g16: np.ndarray) -> np.ndarray:
    g = gamma_exponent(int(g16.sum()), g16.size)
    x = np.maximum(g16.astype(np.float64) / R.G16_MAX, GAMMA_FLOOR)
    return np.rint(np.float64(255.0) * np.power(x, g)).astype(np.uint8)


def clahe_limit(tile_pixels: int, clip_limit: float = CLAHE_CLIP) -> int:
    """The histogram clip limit in units of 2^-15 of a count (at least one count)."""
    return max(int(math.floor(clip_limit * tile_pixels * 128)), 1 << 15)


def clahe(g16: np.ndarray, clip_limit: float = CLAHE_CLIP, tiles: int = CLAHE_TILES) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an image on the 16-bit grid -> uint8:
    ``tiles`` x ``tiles`` regions of the 8-bit image, histograms clipped at ``clip_limit`` x the
    uniform bin height with the excess spread evenly, bilinear interpolation between the tiles'
    mappings. Integer arithmetic throughout (counts in units of 2^-15); tfgraph.clahe is its twin."""
    x = R.g16_to_u8(g16).astype(np.int64)
    h, w = x.shape
    th, y0, y1, wy = R.clahe_grid(h, tiles)
    tw, x0, x1, wx = R.clahe_grid(w, tiles)
    padded = np.pad(x, ((0, th * tiles - h), (0, tw * tiles - w)), mode="symmetric")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    hist = np.stack([np.bincount(b, minlength=256)[:256] for b in blocks]).astype(np.int64) << 15
    npix, limit = th * tw, clahe_limit(th * tw, clip_limit)
    excess = np.maximum(hist - limit, 0).sum(axis=-1, keepdims=True)
    lut = np.cumsum(np.minimum(hist, limit) + excess // 256, axis=-1).reshape(tiles, tiles, 256)

    def sample(yi, xi):
        return lut[yi[:, None], xi[None, :], x]

    wy, wx = wy[:, None], wx[None, :]
    num = ((2 * th - wy) * ((2 * tw - wx) * sample(y0, x0) + wx * sample(y0, x1))
           + wy * ((2 * tw - wx) * sample(y1, x0) + wx * sample(y1, x1)))
    return R.rational_to_u8(num, 4 * th * tw * (npix << 15))


def contrast_g16(g16: np.ndarray, method: str = "none", scratch: bool = False) -> np.ndarray:
    """A resized image on the 16-bit grid -> uint8 with the contrast enhancement compared in the
    CXR literature (Rahman et al. 2021)."""
    if method == "none":
        return R.g16_to_u8(g16, scratch)
    if method == "stretch":
        return _stretch(g16)
    if method == "gamma":
        return _gamma(g16)
    if method == "clahe":
        return clahe(g16)
    raise ValueError(f"unknown contrast method {method!r}; choose from {CONTRAST_METHODS}")


def contrast(img01: np.ndarray, method: str = "none") -> np.ndarray:
    """float [H, W] in [0, 1] -> float32 in [0, 1] after ``method`` (for display and tools)."""
    return contrast_g16(float_to_g16(img01), method, scratch=True).astype(np.float32) / np.float32(255.0)


def prepare(img01: np.ndarray, image_size: int, contrast_method: str = "none") -> np.ndarray:
    """A decoded [H, W] image -> the uint8 [S, S] a model is fed (and the cache stores)."""
    out = contrast_g16(R.resize_g16(float_to_g16(img01), image_size), contrast_method, scratch=True)
    return np.ascontiguousarray(out)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """{0, 1} mask [H, W] -> uint8 {0, 1} [size, size], nearest neighbour (integer centre rule)."""
    m = np.asarray(mask)
    h, w = m.shape
    out = m[R.nearest_index(h, size)][:, R.nearest_index(w, size)]
    return (out > 0).astype(np.uint8)


def mask_from_probs(probs: np.ndarray, height: int, width: int | None = None, threshold: float = 0.5) -> np.ndarray:
    """Mask probabilities [h, w] -> bool [height, width]: the exact resize of the probabilities
    (on the 16-bit grid), then the threshold (one definition for crops, mask PNGs and serving)."""
    p = np.asarray(probs, np.float32)
    p = p[..., 0] if p.ndim == 3 else p
    width = height if width is None else width
    return R.resize_g16(float_to_g16(p), int(height), int(width)) >= mask_threshold_g16(threshold)


def mask_threshold_g16(threshold: float = 0.5) -> int:
    """A probability threshold on the 16-bit grid (0.5 -> 32768: half range and above)."""
    return int(math.ceil(threshold * R.G16_MAX))


def numpy_to_png_bytes(gray01: np.ndarray) -> bytes:
    """A decoded float [H, W] in [0, 1] -> PNG bytes that decode (here and in the SavedModel) to
    the same 16-bit grid values: 8-bit when every value is a multiple of 257 (an 8-bit source),
    else 16-bit. A 16-bit PNG is read back by its bit depth, so its peak must reach the top bit:
    true for every image the decoders here produce (bit-depth scaling puts the peak above half
    range, DICOM is stretched to the full range)."""
    g16 = float_to_g16(gray01)
    if not np.any(g16 % 257):
        arr = (g16 // 257).astype(np.uint8)
    else:
        if g16.max() < 1 << 15:
            raise ValueError("a 16-bit image whose peak is below half range would decode to other values")
        arr = g16.astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

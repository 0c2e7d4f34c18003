"""Host-side preprocessing in NumPy/Pillow: decode, resize, contrast, quantise.

This is what the input cache stores and what prediction feeds a model, on every Keras
backend (no TensorFlow here). ``covidcxr/data/tfgraph.py`` is the same sequence in
TensorFlow ops for the SavedModel's serving signature; tests/test_preprocess.py checks
that the two give the same uint8 pixels.

    decode (gray float32 in [0, 1]; 16-bit scaled by its real bit depth)
      -> resize (antialiased bilinear, as tf.image.resize(antialias=True))
      -> contrast (none | stretch | clahe | gamma) -> quantise to uint8
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

CONTRAST_METHODS = ("none", "stretch", "clahe", "gamma")
RGB_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale's
_POW2 = np.array([1 << k for k in range(8, 16)], np.float32)   # 256 .. 32768


def bit_depth(max_value: float) -> int:
    """Smallest bit depth (8..16) that holds ``max_value``: how a 10/12/14/16-bit radiograph
    stored in a 16-bit container is scaled, so 8- and 16-bit copies of a film agree."""
    return 8 + int(np.sum(np.float32(max_value) >= _POW2))


def scale_by_bit_depth(raw: np.ndarray) -> np.ndarray:
    """Integer pixel values of a 16-bit container -> float32 in [0, 1] by their real bit depth."""
    raw = raw.astype(np.float32)
    bits = bit_depth(raw.max() if raw.size else 0.0)
    return raw / np.float32((1 << bits) - 1)


def to_gray(arr: np.ndarray) -> np.ndarray:
    """float32 [H, W] (gray) or [H, W, C] (C = 2: gray + alpha, 3: RGB, 4: RGBA) in [0, 1] ->
    float32 [H, W]; RGB uses TensorFlow's luma weights, alpha is ignored (as tf.io.decode_image)."""
    if arr.ndim == 2:
        return arr
    if arr.shape[-1] in (1, 2):
        return np.ascontiguousarray(arr[..., 0])
    return (arr[..., :3] @ RGB_WEIGHTS).astype(np.float32)


def resize(img01: np.ndarray, size: int) -> np.ndarray:
    """[H, W] float -> [size, size] float32 in [0, 1]: bilinear with a triangle filter widened by
    the downscale factor (antialiasing), pixel centres at +0.5, like tf.image.resize(..., antialias=True)."""
    img = Image.fromarray(np.ascontiguousarray(img01, np.float32), mode="F")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def quantize(img01: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (round half to even, as tf.round)."""
    return np.round(np.clip(img01.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def _stretch(img: np.ndarray) -> np.ndarray:
    """1st-99th percentile linear stretch (index rule as tfgraph.contrast)."""
    flat = np.sort(img, axis=None)
    n = np.float32(flat.size - 1)
    lo, hi = flat[int(n * np.float32(0.01))], flat[int(n * np.float32(0.99))]
    return np.clip((img - lo) / max(hi - lo, np.float32(1e-3)), 0.0, 1.0).astype(np.float32)


def _gamma(img: np.ndarray) -> np.ndarray:
    """Adaptive gamma: the mean intensity goes to 0.5."""
    mean = np.clip(np.float32(img.mean(dtype=np.float32)), 0.05, 0.95)
    g = np.float32(np.log(np.float32(0.5)) / np.log(mean))
    return np.power(np.clip(img, 1e-6, 1.0), g).astype(np.float32)


def clahe(img: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation: ``tiles`` x ``tiles`` regions, histograms
    clipped at ``clip_limit`` x the uniform bin height with the excess spread evenly, bilinear
    interpolation between tile mappings. The same arithmetic as tfgraph.clahe."""
    x = np.round(img * np.float32(255.0)).astype(np.int64)
    h, w = x.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    padded = np.pad(x, ((0, th * tiles - h), (0, tw * tiles - w)), mode="symmetric")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    hist = np.stack([np.bincount(b, minlength=256)[:256] for b in blocks]).astype(np.float32)
    npix = np.float32(th * tw)
    limit = max(np.float32(clip_limit) * npix / np.float32(256.0), np.float32(1.0))
    excess = np.maximum(hist - limit, 0).sum(axis=-1, keepdims=True, dtype=np.float32)
    hist = np.minimum(hist, limit) + excess / np.float32(256.0)
    lut = (np.cumsum(hist, axis=-1, dtype=np.float32) / npix).reshape(tiles, tiles, 256)

    def coords(n, t):
        f = (np.arange(n, dtype=np.float32) + np.float32(0.5)) / np.float32(t) - np.float32(0.5)
        i0 = np.clip(np.floor(f).astype(np.int64), 0, tiles - 1)
        return i0, np.minimum(i0 + 1, tiles - 1), np.clip(f - i0.astype(np.float32), 0.0, 1.0)

    y0, y1, wy = coords(h, th)
    x0, x1, wx = coords(w, tw)
    wy, wx = wy[:, None], wx[None, :]

    def sample(yi, xi):
        return lut[yi[:, None], xi[None, :], x]

    out = ((1 - wy) * ((1 - wx) * sample(y0, x0) + wx * sample(y0, x1))
           + wy * ((1 - wx) * sample(y1, x0) + wx * sample(y1, x1)))
    return out.astype(np.float32)


def contrast(img01: np.ndarray, method: str = "none") -> np.ndarray:
    """Contrast enhancement compared in the CXR literature (Rahman et al. 2021)."""
    if method == "none":
        return img01
    if method == "stretch":
        return _stretch(img01)
    if method == "gamma":
        return _gamma(img01)
    if method == "clahe":
        return clahe(img01)
    raise ValueError(f"unknown contrast method {method!r}; choose from {CONTRAST_METHODS}")


def prepare(img01: np.ndarray, image_size: int, contrast_method: str = "none") -> np.ndarray:
    """A decoded [H, W] image -> the uint8 [S, S] a model is fed (and the cache stores)."""
    return quantize(contrast(resize(img01, image_size), contrast_method))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """{0, 1} mask [H, W] -> uint8 {0, 1} [size, size], nearest neighbour (pixel centres)."""
    m = Image.fromarray(np.asarray(mask, np.uint8))
    if m.size != (size, size):
        m = m.resize((size, size), Image.NEAREST)
    return (np.asarray(m) > 0).astype(np.uint8)


def mask_from_probs(probs: np.ndarray, height: int, width: int | None = None, threshold: float = 0.5) -> np.ndarray:
    """Mask probabilities [h, w] -> bool [height, width]: antialiased bilinear resize of the
    probabilities, then the threshold (one definition for crops, mask PNGs and serving)."""
    p = np.asarray(probs, np.float32)
    p = p[..., 0] if p.ndim == 3 else p
    width = height if width is None else width
    img = Image.fromarray(np.ascontiguousarray(p), mode="F")
    if img.size != (width, height):
        img = img.resize((int(width), int(height)), Image.BILINEAR)
    return np.asarray(img, np.float32) >= threshold


def numpy_to_png_bytes(gray01: np.ndarray) -> bytes:
    """A decoded float [H, W] in [0, 1] -> PNG bytes that decode (here and in the SavedModel) to
    the same values: 8-bit when every value is k/255 (an 8-bit source), else 16-bit. A 16-bit PNG
    is read back by its bit depth, so its peak must reach the top bit: true for every image the
    decoders here produce (bit-depth scaling puts the peak above 0.5, DICOM is stretched to 1)."""
    g = np.clip(np.asarray(gray01, np.float32), 0, 1)
    q8 = np.round(g * np.float32(255.0))
    if np.array_equal(q8 / np.float32(255.0), g):
        arr = q8.astype(np.uint8)
    else:
        if g.max() < 0.5:
            raise ValueError("a 16-bit image whose peak is below half range would decode to other values")
        arr = (g * 65535 + 0.5).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

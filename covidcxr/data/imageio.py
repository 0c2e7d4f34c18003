"""Reading X-ray files into arrays, and the per-file check used by ``index``.

Everything here is NumPy/Pillow/pydicom: no TensorFlow, so it is usable in
worker threads and in tools that must start fast.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from covidcxr.data import preprocess, resample
from covidcxr.errors import DataError

# A truncated file must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

RASTER_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
IMAGE_EXTENSIONS = RASTER_EXTENSIONS | DICOM_EXTENSIONS
# Formats tf.io.decode_image reads inside the graph; others go through Python.
TF_DECODABLE = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})

THUMB_SIZE = 32


class ImageReadError(DataError):
    """A file that cannot be read as an image."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_dicom(path: str | Path) -> bool:
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


def _read_dicom(path: Path, data: bytes | None = None) -> tuple[np.ndarray, str]:
    try:
        import pydicom  # only DICOM input needs it
        from pydicom.pixels import apply_voi_lut  # only DICOM input needs it
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(f"{path}: pydicom is needed for DICOM input ({exc})") from exc
    try:
        ds = pydicom.dcmread(str(path) if data is None else io.BytesIO(data))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (rare for CXR)
        arr = arr[..., :3].mean(axis=-1)
    elif arr.ndim == 3:  # multi-frame: take the first frame
        arr = arr[0]
    try:
        arr = apply_voi_lut(arr, ds).astype(np.float32)
    except Exception:
        pass  # no usable VOI LUT/window: fall back to the full range
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return preprocess.g16_to_float(preprocess.float_to_g16(_stretch(arr))), f"DICOM/{getattr(ds, 'PhotometricInterpretation', '?')}"


def _stretch(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> float32 HxW in [0, 1] on the 16-bit grid, the values the
    SavedModel's in-graph decoder gives for the same file (covidcxr/data/tfgraph.py): 8-bit v ->
    257 v; 16-bit gray by its real bit depth (a 12-bit film in a 16-bit PNG is scaled from 4095, so
    8- and 16-bit copies agree); RGB(A) and palette by Pillow's integer luma; alpha ignored.
    (Pillow reads 16-bit colour PNGs as 8-bit, their high bytes; the graph does the same.)"""
    mode = img.mode
    if mode == "F":  # float TIFF: no defined range
        return preprocess.g16_to_float(preprocess.float_to_g16(_stretch(np.asarray(img, dtype=np.float32))))
    if mode in SIXTEEN_BIT_MODES:
        return preprocess.g16_to_float(preprocess.sixteen_to_g16(np.asarray(img)))
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
    return preprocess.u8_to_float(np.asarray(img))


def _dicom_bytes(data: bytes) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    return data[128:132] == b"DICM"


def read_image(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Read an X-ray (PNG/JPEG/BMP/TIFF 8/16-bit, L/RGB/RGBA, or DICOM).

    ``data``: the file's bytes, already read (from object storage, say); ``path`` then only names it
    (and its suffix, or the DICM marker, says DICOM). Returns float32 grayscale, shape (H, W),
    values in [0, 1]. Raises ImageReadError naming the file on any failure.
    """
    path = Path(path)
    if is_dicom(path) or (data is not None and _dicom_bytes(data)):
        return _read_dicom(path, data)[0]
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            return _pil_to_gray(img)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image ({_reason(exc)})") from exc


def decode_file(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray | None, str]:
    """(decoded image, '') or (None, the reason it cannot be read): read_image without raising."""
    try:
        return read_image(path, data), ""
    except ImageReadError as exc:
        if data is None and not Path(path).exists():
            return None, "file not found"
        return None, str(exc).split(": ", 1)[-1]


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask (any mode, any values): uint8 (H, W) in {0, 1}.

    Decoded as an image (RGB masks reduced to gray), thresholded at half range (16-bit grid
    value 32768 and above), and resized with nearest neighbour (integer centre rule, as in the
    SavedModel) to ``size`` = (width, height).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            g16 = preprocess.float_to_g16(_pil_to_gray(img))
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read mask ({_reason(exc)})") from exc
    mask = (g16 >= preprocess.mask_threshold_g16()).astype(np.uint8)
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        w, h = size
        mask = mask[resample.nearest_index(mask.shape[0], h)][:, resample.nearest_index(mask.shape[1], w)]
    return mask


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return "file is truncated"
    if "cannot identify image file" in text:
        return "not an image or unsupported format"
    return text


@dataclass
class FileInfo:
    """What ``index`` learns about one image file in a single decode."""

    path: str
    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    sha256: str = ""
    phash: int = 0
    phash_mirror: int = 0
    thumb: np.ndarray | None = None  # THUMB_SIZE x THUMB_SIZE uint8
    gray: np.ndarray | None = None   # the decoded image (inspect_file(keep_gray=True))


def _thumbnail(gray: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return np.asarray(img.resize((THUMB_SIZE, THUMB_SIZE), Image.BILINEAR), dtype=np.uint8)


@functools.lru_cache(maxsize=2)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x @ D.T`` equals scipy.fft.dctn(x, norm="ortho")."""
    k = np.arange(n)[:, None]
    d = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def _hash_bits(coeffs: np.ndarray) -> int:
    c = coeffs[:8, :8].ravel()
    return int(np.packbits(c > np.median(c[1:])).view(">u8")[0])


def perceptual_hashes(thumb: np.ndarray) -> tuple[int, int]:
    """64-bit pHash of a thumbnail and of its left-right mirror image: the sign of the 8x8 lowest
    DCT frequencies against their median. One DCT serves both (mirroring a row negates its odd
    horizontal frequencies)."""
    d = _dct_matrix(thumb.shape[0])
    coeffs = d @ thumb.astype(np.float64) @ d.T
    mirrored = coeffs * np.where(np.arange(coeffs.shape[1]) % 2, -1.0, 1.0)[None, :]
    return _hash_bits(coeffs), _hash_bits(mirrored)


def perceptual_hash(thumb: np.ndarray) -> int:
    """64-bit pHash: sign of the 8x8 lowest DCT frequencies against their median."""
    return perceptual_hashes(thumb)[0]


def inspect_file(path: str | Path, keep_gray: bool = False) -> FileInfo:
    """Fully decode one image: size, mode, sha256, perceptual hashes, thumbnail (and, with
    ``keep_gray``, the decoded float image itself, so one read serves both checks and pixels).

    Never raises: a bad file comes back with ok=False and the reason.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return FileInfo(str(path), False, "file not found")
    except OSError as exc:
        return FileInfo(str(path), False, f"cannot read file ({exc.strerror or exc})")
    if not data:
        return FileInfo(str(path), False, "empty file (0 bytes)")
    sha = hashlib.sha256(data).hexdigest()
    try:
        if is_dicom(path):
            gray, mode = _read_dicom(path)
            h, w = gray.shape
        else:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                mode, (w, h) = img.mode, img.size
                gray = _pil_to_gray(img)
    except ImageReadError as exc:
        return FileInfo(str(path), False, str(exc).split(": ", 1)[-1], sha256=sha)
    except Exception as exc:
        return FileInfo(str(path), False, _reason(exc), sha256=sha)
    if w < 8 or h < 8:
        return FileInfo(str(path), False, f"image too small ({w}x{h})", sha256=sha)
    thumb = _thumbnail(gray)
    return FileInfo(str(path), True, "", w, h, mode, sha, *perceptual_hashes(thumb), thumb,
                    gray if keep_gray else None)


def check_mask(path: str | Path) -> str:
    """Return '' if the mask file is readable, else the reason."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:
        return _reason(exc)
    return ""

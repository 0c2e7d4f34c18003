"""The export check: the SavedModel must see the host's pixels, and give Keras's outputs on them.

Two questions, answered apart, so a failure says which one it is:

1. **Pixels.** The SavedModel's own preprocessing (its ``pixels`` endpoint, fed the file bytes)
   against the host's (covidcxr/data/preprocess.py, what training and ``predict`` feed the
   model) on the check files. They must be identical: any differing pixel fails the export.
   For a classifier that crops with a lung segmenter, the image pixels and the crop mask are
   compared separately (the mask comes from the segmenter's float outputs).
2. **Numerics.** The SavedModel's model (``from_pixels``) against the Keras model on the *same*
   input pixels, within ``TOLERANCE``: a difference here is the backend's arithmetic, not the data.

The end-to-end difference (bytes in, outputs out) is reported beside them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidcxr.artifacts import LungCrop
from covidcxr.errors import CovidCXRError, DataError
from covidcxr.inference import Item, Predictor

TOLERANCE = 1e-4  # max |probability / mask difference| between SavedModel and Keras on the same pixels


class ExportCheckError(CovidCXRError):
    """The SavedModel does not reproduce the Keras model; the message says whether pixels or numerics."""


@dataclass
class PixelReport:
    files: int = 0
    files_differing: int = 0
    pixels_differing: int = 0
    max_levels: int = 0
    example: str = ""

    def add(self, path: str, host: np.ndarray, graph: np.ndarray) -> None:
        self.files += 1
        diff = np.abs(host.astype(np.int32) - graph.astype(np.int32))
        if diff.any():
            self.files_differing += 1
            self.pixels_differing += int((diff > 0).sum())
            self.max_levels = max(self.max_levels, int(diff.max()))
            self.example = self.example or path

    def describe(self, what: str) -> str:
        return (f"{what} differ on {self.pixels_differing} pixels in {self.files_differing} of {self.files} files "
                f"(up to {self.max_levels} grey levels; e.g. {self.example})")


@dataclass
class ExportCheck:
    files: int
    pixels: PixelReport = field(default_factory=PixelReport)
    crop_masks: PixelReport | None = None
    on_same_pixels: float = 0.0       # max |SavedModel - Keras| given identical input pixels
    end_to_end: float = 0.0           # max |SavedModel(bytes) - Keras(host pixels)|

    def problems(self, tolerance: float = TOLERANCE) -> list[str]:
        out = []
        if self.pixels.files_differing:
            out.append("preprocessing: the SavedModel's input " + self.pixels.describe("pixels") + " from the host's")
        if self.crop_masks is not None and self.crop_masks.files_differing:
            out.append("lung crop: with identical image pixels, the SavedModel's lung-cropped "
                       + self.crop_masks.describe("pixels") + " from the host's (its segmenter's numerics)")
        if self.on_same_pixels > tolerance:
            out.append(f"numerics: on identical input pixels the SavedModel's outputs differ from Keras's by "
                       f"{self.on_same_pixels:.2e} (> {tolerance})")
        return out

    def summary(self) -> str:
        return (f"checked on {self.files} images: identical pixels, max output difference {self.on_same_pixels:.1e} "
                f"on the same pixels, {self.end_to_end:.1e} end to end")


def max_diff(a, b) -> float:
    return 0.0 if a is None or b is None else float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check_export(folder: Path, paths: list[str], masks: list[str]) -> ExportCheck | None:
    """Compare the SavedModel in ``folder`` with its Keras model on ``paths``; None when there is nothing to check."""
    if not paths:
        return None
    items = [Item(p, m) for p, m in zip(paths, masks)]
    ref = list(Predictor(folder, batch_size=len(items)).run(items))[0]
    sm = Predictor(folder, batch_size=len(items), prefer="savedmodel")
    got = list(sm.run(items, pixels=True))[0]
    if ref.failed or got.failed:
        bad = (ref.failed or got.failed)[0]
        raise DataError(f"export check: {bad.item.path}: {bad.reason}; pass --check with readable image files.")
    check = ExportCheck(len(ref.done))
    cropped = sm.card.lung_crop is LungCrop.MODEL
    check.crop_masks = PixelReport() if cropped else None
    for i, d in enumerate(ref.done):
        check.pixels.add(d.item.path, d.image, got.image_pixels[i][..., 0])
        if cropped:
            check.crop_masks.add(d.item.path, ref.x[i], got.x[i])
        elif sm.card.lung_crop is LungCrop.GIVEN:
            check.pixels.add(d.item.path + " (lung-cropped)", ref.x[i], got.x[i])
    same = sm.from_pixels(ref.x)
    check.on_same_pixels = max(max_diff(ref.probs, same.get("probabilities")), max_diff(ref.masks, same.get("mask")))
    check.end_to_end = max(max_diff(ref.probs, got.probs), max_diff(ref.masks, got.masks))
    return check


def require(check: ExportCheck | None, tolerance: float = TOLERANCE) -> None:
    """Raise ExportCheckError naming what failed (pixels, crop masks or numerics) and by how much."""
    problems = [] if check is None else check.problems(tolerance)
    if problems:
        raise ExportCheckError("exported SavedModel does not reproduce the Keras model on the check images; export "
                               "discarded. " + "; ".join(problems) + ".")

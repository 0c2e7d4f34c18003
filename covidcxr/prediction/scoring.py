"""From a finished ``inference.Batch`` to output rows: the one row builder of ``predict`` (every
engine, Ray's actors included), so every path writes the same columns and values."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from covidcxr.calibration import apply_temperature
from covidcxr.data.preprocess import mask_from_probs
from covidcxr.gradcam import render_cam
from covidcxr.masks import save_png
from covidcxr.prediction.flags import add_flags


class Scorer:
    """Turns each finished ``inference.Batch`` into output rows, writing its mask PNGs and Grad-CAM
    figures on the way (one model call and one Grad-CAM pass per batch). ``dupes``: file stems that
    occur more than once in the whole input list; those files get the path's sha1 in their names, so
    names are unique and the same in every shard and on resume. Without ``mask_dir`` a segmenter's
    rows still carry the mask's fraction and size, and ``mask_path`` is empty."""

    def __init__(self, classes, temperature=None, mask_dir=None, cam=None, cam_dir=None, dupes=frozenset(), op=None,
                 segments=False):
        self.classes, self.temperature, self.mask_dir, self.op = list(classes), temperature, mask_dir, op
        self.cam, self.cam_dir, self.dupes = cam, cam_dir, dupes
        self.segments = segments or mask_dir is not None

    def name(self, path: str, kind: str, folder: Path) -> Path:
        stem = Path(path).stem
        stem += "_" + hashlib.sha1(path.encode()).hexdigest()[:8] if stem in self.dupes else ""
        return folder / f"{stem}_{kind}.png"

    def rows(self, batch) -> list[dict]:
        rows = [{"path": d.item.path} for d in batch.done]
        if batch.probs is not None:
            probs = batch.probs if self.temperature is None else apply_temperature(batch.probs, self.temperature)
            for row, p in zip(rows, probs):
                row["label"] = self.classes[int(np.argmax(p))]
                row.update({f"prob_{c}": float(v) for c, v in zip(self.classes, p)})
            if self.op is not None:
                add_flags(rows, batch.probs, self.op, self.classes)
        if self.segments and batch.masks is not None:
            for row, d, m in zip(rows, batch.done, batch.masks):
                self._mask(row, d, m)
        if self.cam is not None and batch.done:
            self._cams(batch, rows)
        return rows

    def _mask(self, row: dict, d, probs: np.ndarray) -> None:
        mask = mask_from_probs(probs, d.height, d.width)
        dest = "" if self.mask_dir is None else str(save_png(mask, self.name(d.item.path, "mask", self.mask_dir)))
        row.update(mask_path=dest, mask_fraction=float(mask.mean()), height=int(d.height), width=int(d.width))

    def _cams(self, batch, rows: list[dict]) -> None:
        res = self.cam.explain(batch.x)
        for i, (d, row) in enumerate(zip(batch.done, rows)):
            title = [f"predicted {row['label']} ({row['prob_' + row['label']]:.2f})", Path(d.item.path).name]
            render_cam(d.gray, res.heatmaps[i], self.name(d.item.path, "gradcam", self.cam_dir), title, res.note(i))

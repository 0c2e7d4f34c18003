"""What the app shows for one film: the same Predictor, temperature and Grad-CAM as ``covidcxr.predict``.

``FilmViewer(model).show(path)`` -> ``FilmResult``: the predicted class and the probabilities exactly as
``predict`` writes them for that file (``--calibrated`` when a calibration.json is found beside the model,
as predict finds it), the operating-point flag when an operating_point.json is there, the Grad-CAM figure
(with its colour bar, drawn by ``gradcam.render_cam``) and the layer in words, and the mask overlay for
segmenters, multi-task models and classifiers that crop with a lung segmenter. A file that cannot be read
gives a ``FilmResult`` with ``error`` set, never an exception.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.artifacts import CALIBRATION, LungCrop
from covidcxr.calibration import apply_temperature, load_temperature
from covidcxr.data.preprocess import mask_from_probs
from covidcxr.errors import ConfigError, CovidCXRError, DataError
from covidcxr.gradcam import GradCAM, GradCAMError, render_cam
from covidcxr.inference import Item, Predictor
from covidcxr.masks import overlay

OPERATING_POINT = "operating_point.json"


@dataclass
class FilmResult:
    """One film as the page shows it. ``probs``: {class: probability} in the model's class order."""

    path: str
    name: str
    label: str = ""
    probs: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False
    flag: str = ""                      # the operating point's verdict in words ('' without one)
    cam: np.ndarray | None = None       # RGB Grad-CAM figure (overlay + colour bar + title)
    cam_layer: str = ""                 # the Grad-CAM layer in words
    mask: np.ndarray | None = None      # RGB lung/infection mask overlay
    mask_note: str = ""
    film: np.ndarray | None = None      # the film itself, uint8 gray at its own size
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def model_homes(model_arg: str | Path, root: Path) -> list[Path]:
    """Where calibration.json / operating_point.json are looked for, in predict's order: the model's
    folder, the located model's folder, and the two folders above."""
    home = Path(model_arg) if Path(model_arg).is_dir() else Path(model_arg).parent
    return list(dict.fromkeys((home, Path(root), home.parent, home.parent.parent)))


def find_beside(model_arg: str | Path, root: Path, name: str) -> Path | None:
    return next((d / name for d in model_homes(model_arg, root) if (d / name).exists()), None)


def read_temperature(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return load_temperature(path)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is not a calibration file ({exc}).") from exc


def read_operating_point(path: Path | None, classes: list[str]) -> dict | None:
    """{"class", "threshold"} of operating_point.json, None without one; refused when it names no class
    of the model."""
    if path is None:
        return None
    try:
        op = json.loads(path.read_text())
        cls, thr = op["class"], float(op["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not an operating point ({{\"class\": ..., \"threshold\": ...}}): {exc}") from exc
    if cls not in classes:
        raise ConfigError(f"{path}: class {cls!r} is not one of the model's classes {classes}.")
    return {"class": cls, "threshold": thr, "path": str(path)}


def flag_text(op: dict | None, probs: dict[str, float]) -> str:
    if op is None or not probs:
        return ""
    p, c, t = probs[op["class"]], op["class"], op["threshold"]
    verdict = "FLAGGED" if p >= t else "not flagged"
    return f"{verdict}: P({c}) {p:.4f} {'>=' if p >= t else '<'} operating-point threshold {t:.4f}"


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class FilmViewer:
    """The model loaded once, and everything the Film tab needs per file."""

    def __init__(self, model: str | Path, batch_size: int = 1):
        self.model_arg = str(model)
        self.pred = Predictor(model, batch_size=batch_size, workers=1)
        if self.pred.card.lung_crop is LungCrop.GIVEN:
            raise ConfigError(f"--model {model} was trained on given lung crops (--lung-crop given): each film needs "
                              f"its lung mask, which the app does not take; use python -m covidcxr.predict "
                              f"--lung-masks DIR.")
        root = self.pred.located.root
        self.classes = self.pred.classes
        classifies = self.pred.task.classifies
        self.calibration = find_beside(model, root, CALIBRATION) if classifies else None
        self.temperature = read_temperature(self.calibration)
        self.operating_point = read_operating_point(find_beside(model, root, OPERATING_POINT), self.classes) \
            if classifies else None
        self.cam, self.cam_error = None, ""
        if self.pred.task.only_classifies and self.pred.model is not None:
            try:
                self.cam = GradCAM(self.pred.model, compile=True)   # compiled once, by warm_up
            except GradCAMError as exc:
                self.cam_error = str(exc)
        self.cam_layer = self.cam.describe() if self.cam is not None else ""
        self._tmp = Path(tempfile.mkdtemp(prefix="covidcxr-app-"))

    @property
    def task(self):
        return self.pred.task

    def show(self, path: str | Path) -> FilmResult:
        """The page's result for one file (``error`` set when it cannot be read or scored)."""
        res = FilmResult(str(path), Path(path).name)
        try:
            batch = next(iter(self.pred.run([Item(str(path))], keep_gray=True)))
            if batch.failed or not batch.done:
                reason = batch.failed[0].reason if batch.failed else "nothing decoded"
                res.error = f"{res.name}: cannot be read as an X-ray ({reason})."
                return res
            self._fill(res, batch)
        except CovidCXRError as exc:
            res.error = f"{res.name}: {exc}"
        except Exception as exc:  # the page gets one line, never a stack trace
            res.error = f"{res.name}: could not be scored ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})."
        return res

    def warm_up(self) -> float:
        """One made-up film through everything ``show`` does (decode, model, Grad-CAM, figures), so the
        first real film does not pay for tracing and compiling; returns the seconds it took."""
        start = time.perf_counter()
        path = self._tmp / "warm-up.png"
        noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        res = self.show(path)
        if res.error:
            raise DataError(f"warm-up of --model {self.model_arg} failed: {res.error}")
        return time.perf_counter() - start

    def show_many(self, paths) -> list[FilmResult]:
        return [self.show(p) for p in paths]

    def _fill(self, res: FilmResult, batch) -> None:
        d = batch.done[0]
        res.film = (np.clip(d.gray, 0, 1) * 255 + 0.5).astype(np.uint8)
        if batch.probs is not None:
            probs = batch.probs if self.temperature is None else apply_temperature(batch.probs, self.temperature)
            p = probs[0]
            res.label = self.classes[int(np.argmax(p))]   # predict's rule, on the same numbers
            res.probs = {c: float(v) for c, v in zip(self.classes, p)}
            res.calibrated = self.temperature is not None
            res.flag = flag_text(self.operating_point, res.probs)
        if self.cam is not None:
            cam = self.cam.explain(batch.x)
            title = [f"predicted {res.label} ({res.probs[res.label]:.2f})", res.name]
            out = self._tmp / "gradcam.png"
            res.cam = _rgb(render_cam(d.gray, cam.heatmaps[0], out, title, cam.note(0)))
            res.cam_layer = self.cam_layer
        self._mask(res, batch, d)

    def _mask(self, res: FilmResult, batch, d) -> None:
        """The mask drawn over the film: the model's own (segmenters, multi-task) or its lung segmenter's."""
        if self.task.segments and batch.masks is not None:
            mask = mask_from_probs(batch.masks[0], d.height, d.width)
            target = self.pred.card.target or "mask"
            res.mask_note = f"predicted {target} mask: {mask.mean():.1%} of the film"
        elif self.pred.segmenter is not None:
            seg = next(iter(self.pred.segmenter.run([Item(d.item.path)])))
            if not seg.done:
                raise DataError("the lung segmenter could not read this file")
            mask = mask_from_probs(seg.masks[0], d.height, d.width)
            res.mask_note = f"lungs found by the model's lung segmenter (the classifier saw only these): " \
                            f"{mask.mean():.1%} of the film"
        else:
            return
        res.mask = overlay(d.gray, mask)

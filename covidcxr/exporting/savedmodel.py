"""The export writer: ``model.keras``, the card, fingerprints, calibration, operating point, a lung segmenter where the
model has one, the formats asked for (``serving/1``, the SavedModel with the endpoints of ``signatures.py``;
``model.onnx``, see ``onnxfile.py``), MODEL_CARD.md and the README.md that is the Hub model card, written
into ``OUT.partial`` and kept only when every format's check passes. Imports TensorFlow (through
``signatures``): ``covidcxr.exporting.export_run`` loads it where TensorFlow is the backend.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import keras
import pandas as pd

from covidcxr import artifacts as A
from covidcxr.errors import DataError
from covidcxr.exporting.check import check_export, require
from covidcxr.exporting.onnxfile import require_packages, write_onnx
from covidcxr.exporting.readme import README, hub_readme
from covidcxr.exporting.signatures import classifier_fns, segmenter_fns
from covidcxr.inference import load_keras
from covidcxr.modelcard import write_export as write_model_card
from covidcxr.tasks import get_task

CHECK_IMAGES = 24


def default_checks(loc: A.Located, n: int = CHECK_IMAGES) -> tuple[list[str], list[str]]:
    """Up to ``n`` held-out images (and their lung masks) of the run's manifest to check the export
    on: one of each file kind first (mode and size, e.g. 8-bit gray 299 px, RGB, 16-bit), then
    evenly spread over the rest, so the pixel check meets what the data holds."""
    man = loc.manifest_path
    if man is None:
        return [], []
    df = pd.read_csv(man, dtype=str, keep_default_na=False)
    df = df[df["split"].isin(["val", "test"])] if (df["split"].isin(["val", "test"])).any() else df
    if loc.card.lung_crop is A.LungCrop.GIVEN:
        df = df[df.get("lung_mask", "") != ""]
    df = df[[os.path.exists(p) for p in df["path"]]]
    kinds = [c for c in ("mode", "width", "height", "label") if c in df]
    first = df.drop_duplicates(kinds).head(n) if kinds else df.head(0)
    rest = df.drop(first.index)
    step = max(1, len(rest) // max(1, n - len(first)))
    df = pd.concat([first, rest.iloc[::step]]).head(n)
    return df["path"].tolist(), (df["lung_mask"].tolist() if "lung_mask" in df else [""] * len(df))


def _write_savedmodel(model, segmenter, fns: dict, tmp: Path, paths: list[str], masks: list[str]) -> str:
    archive = keras.export.ExportArchive()
    archive.track(model)
    if segmenter is not None:
        archive.track(segmenter[0])
    for name, fn in fns.items():
        archive.add_endpoint(name, fn)
    archive.write_out(str(tmp / A.SERVING), verbose=False)
    check = check_export(tmp, paths, masks)
    require(check)
    return check.summary() if check else "not checked: no check images"


def export_model(loc: A.Located, out: str | Path, overwrite: bool = False, checks: list[str] | None = None,
                 log=print, formats: tuple[str, ...] = ("savedmodel",)) -> Path:
    if "onnx" in formats:
        require_packages()
    if loc.keras_path is None:
        raise DataError(f"{loc.root}: a bare SavedModel; export from the run or export folder (model.keras).")
    out = Path(out)
    A.check_free(out, overwrite)
    model, card = load_keras(loc.keras_path), loc.card
    segmenter = None
    if card.lung_crop is A.LungCrop.MODEL:
        if loc.segmenter_dir is None:
            raise DataError(f"{loc.root}: this classifier crops with a lung segmenter and its lung_segmenter/ is "
                            f"missing; export from the run folder.")
        segmenter = (load_keras(loc.segmenter_dir / A.EXPORT_MODEL), A.ModelCard.load(loc.segmenter_dir))
    fns = {}
    if "savedmodel" in formats:
        fns = segmenter_fns(model, card) if get_task(card.task).segments else classifier_fns(model, card, segmenter)
    paths, masks = (checks, [""] * len(checks)) if checks else default_checks(loc)
    with A.staged(out, overwrite) as tmp:
        model.save(tmp / A.EXPORT_MODEL)
        card.save(tmp)
        for name in (A.FINGERPRINTS, A.CALIBRATION, A.OPERATING_POINT):
            if (loc.root / name).exists():
                shutil.copy(loc.root / name, tmp / name)
        if segmenter is not None:
            shutil.copytree(loc.segmenter_dir, tmp / A.SEGMENTER_DIR)
        checked = []
        if "savedmodel" in formats:
            checked.append(_write_savedmodel(model, segmenter, fns, tmp, paths, masks))
        if "onnx" in formats:
            checked.append(write_onnx(model, segmenter, card, tmp, paths, masks))
        summary = "; ".join(checked)
        write_model_card(loc.root, tmp, get_task(card.task), summary)   # MODEL_CARD.md beside model.keras and serving/
        (tmp / README).write_text(hub_readme(tmp, loc.root, card, summary))   # the Hub model card, then the usage
    wrote = [f"SavedModel in {out / A.SERVING}"] * ("savedmodel" in formats) \
        + [str(out / A.ONNX_MODEL)] * ("onnx" in formats)
    log(f"exported {out} ({', '.join(wrote)}; {summary})")
    return out

"""Exports for serving: ``<out>/serving/1`` (TF SavedModel taking image bytes), ``model.keras``,
``model_card.json``, the training fingerprints (for the overlap guard) and, for lung-cropped
classifiers, their segmenter.

Written into ``OUT.partial``; the SavedModel is reloaded and must reproduce the Keras model on
real files (the same decoded pixels through both) before the folder is renamed to ``OUT``.
The SavedModel is written by TensorFlow: a run trained on JAX or PyTorch is exported by
running ``python -m covidcxr.export`` under the TensorFlow backend (``export_run`` does it).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from covidcxr import artifacts as A
from covidcxr.errors import CovidCXRError, DataError

TOLERANCE = 1e-4  # max |probability / mask difference| between SavedModel and Keras on the same file


def export_run(src: str | Path, out: str | Path, overwrite: bool = False, checks: list[str] | None = None,
               log=print) -> Path | None:
    """Export ``src`` (run, export or .keras) to ``out``; under another backend, via a TensorFlow subprocess."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return export_model(A.locate(src), out, overwrite, checks, log)
    if importlib.util.find_spec("tensorflow") is None:
        log(f"NOTE: no export written: the SavedModel needs TensorFlow, which is not installed here. Export later "
            f"with: pip install tensorflow; KERAS_BACKEND=tensorflow python -m covidcxr.export {src} --out {out}")
        return None
    cmd = [sys.executable, "-m", "covidcxr.export", str(src), "--out", str(out)] + (["--overwrite"] if overwrite else [])
    cmd += [a for c in (checks or []) for a in ("--check", c)]
    log(f"exporting under the TensorFlow backend: {' '.join(cmd)}")
    r = subprocess.run(cmd, env={**os.environ, "KERAS_BACKEND": "tensorflow"}, capture_output=True, text=True)
    if r.returncode:
        raise CovidCXRError(f"export failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    log(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exported {out}")
    return Path(out)


def default_checks(loc: A.Located, n: int = 4) -> tuple[list[str], list[str]]:
    """A few validation images (and their lung masks) of the run's manifest to check the export on."""
    man = loc.manifest_path
    if man is None:
        return [], []
    import pandas as pd

    df = pd.read_csv(man, dtype=str, keep_default_na=False)
    df = df[df["split"].isin(["val", "test"])] if (df["split"].isin(["val", "test"])).any() else df
    if loc.card.lung_crop == "given":
        df = df[df.get("lung_mask", "") != ""]
    df = df[[os.path.exists(p) for p in df["path"]]].head(n)
    return df["path"].tolist(), (df["lung_mask"].tolist() if "lung_mask" in df else [""] * len(df))


def export_model(loc: A.Located, out: str | Path, overwrite: bool = False, checks: list[str] | None = None,
                 log=print) -> Path:
    import keras

    from covidcxr.exporting.signatures import classifier_fn, segmenter_fn
    from covidcxr.inference import load_keras

    if loc.keras_path is None:
        raise DataError(f"{loc.root}: a bare SavedModel; export from the run or export folder (model.keras).")
    out = Path(out)
    A.check_free(out, overwrite)
    model, card = load_keras(loc.keras_path), loc.card
    segmenter = None
    if card.lung_crop == "model":
        if loc.segmenter_dir is None:
            raise DataError(f"{loc.root}: this classifier crops with a lung segmenter and its lung_segmenter/ is "
                            f"missing; export from the run folder.")
        segmenter = (load_keras(loc.segmenter_dir / A.EXPORT_MODEL), A.ModelCard.load(loc.segmenter_dir))
    fn = classifier_fn(model, card, segmenter) if card.task == "classify" else segmenter_fn(model, card)
    paths, masks = (checks, [""] * len(checks)) if checks else default_checks(loc)
    with A.staged(out, overwrite) as tmp:
        model.save(tmp / A.EXPORT_MODEL)
        card.save(tmp)
        for name in (A.FINGERPRINTS, A.CALIBRATION):
            if (loc.root / name).exists():
                shutil.copy(loc.root / name, tmp / name)
        if segmenter is not None:
            shutil.copytree(loc.segmenter_dir, tmp / A.SEGMENTER_DIR)
        archive = keras.export.ExportArchive()
        archive.track(model)
        if segmenter is not None:
            archive.track(segmenter[0])
        archive.add_endpoint("serving_default", fn)
        archive.write_out(str(tmp / A.SERVING), verbose=False)
        worst = check_export(tmp, paths, masks)
        if worst is not None and worst > TOLERANCE:
            raise CovidCXRError(f"exported SavedModel differs from the Keras model by {worst:.2e} (> {TOLERANCE}) on "
                                f"the check images; export discarded.")
    log(f"exported {out} (SavedModel in {out / A.SERVING}"
        + (f"; checked on {len(paths)} images, max difference {worst:.1e})" if worst is not None else ")"))
    return out


def check_export(folder: Path, paths: list[str], masks: list[str]) -> float | None:
    """Max difference between the SavedModel (bytes in) and the Keras model (host-decoded pixels)
    on ``paths``; None when there is nothing to check."""
    from covidcxr.inference import Item, Predictor

    if not paths:
        return None
    items = [Item(p, m) for p, m in zip(paths, masks)]
    ref = list(Predictor(folder, batch_size=len(items)).run(items))[0]
    got = list(Predictor(folder, batch_size=len(items), prefer="savedmodel").run(items))[0]
    if ref.failed or got.failed:
        bad = (ref.failed or got.failed)[0]
        raise DataError(f"export check: {bad.item.path}: {bad.reason}; pass --check with readable image files.")
    worst = 0.0
    for a, b in ((ref.probs, got.probs), (ref.masks, got.masks)):
        if a is not None:
            worst = max(worst, float(np.abs(a - b).max()))
    return worst

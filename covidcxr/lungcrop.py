"""Lung-cropped classification: the X-ray multiplied by its lung mask before the classifier.

The papers on these datasets compare whole-image with segmented-lung classification.
``train --lung-crop given`` uses the lung masks that come with the data (every image must
have one: blacking out the images without one would hand the label to the model);
``train --lung-crop SEGMENTER`` uses the masks a lung segmentation model (a ``--task segment
--target lung`` run or export) predicts, for every image. The segmenter is copied into the
run (``lung_segmenter/``) and into the export, whose SavedModel runs it before the
classifier, so a served model needs nothing but the image.

One definition of the predicted crop mask everywhere (training, evaluation, prediction,
serving): the segmenter's probabilities at its own resolution, resized bilinearly
(antialiased) to the classifier's input size, thresholded at 0.5.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image
import numpy as np
import pandas as pd

from covidcxr import artifacts as A
from covidcxr.data import preprocess as P
from covidcxr.errors import ConfigError, DataError
from covidcxr.inference import Item, Predictor
from covidcxr.tasks import get_task

CROP_COLUMN = "crop_mask"


def check_segmenter(path: str | Path) -> A.Located:
    """Refuse, before any work, a --lung-crop path that is not a lung segmenter (reads the card only)."""
    try:
        loc = A.locate(path)
    except DataError as exc:
        raise ConfigError(f"--lung-crop {path}: {exc} Pass 'given' or a lung segmentation run or export "
                          f"(python -m covidcxr.train --task segment --target lung).") from None
    card = loc.card
    if not get_task(card.task).segments or (card.target or "lung") != "lung":
        raise ConfigError(f"--lung-crop {path}: not a lung segmentation model (task {card.task}, target "
                          f"{card.target}); train one with python -m covidcxr.train --task segment --target lung.")
    if loc.keras_path is None:
        raise ConfigError(f"--lung-crop {path}: a bare SavedModel; pass the run or export folder (model.keras).")
    return loc


def given_masks(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest with crop masks = the data's lung masks; refuses when any image has none."""
    has = df["lung_mask"].astype(str) != "" if "lung_mask" in df else pd.Series(False, index=df.index)
    if not has.all():
        first = df["path"][~has].iloc[0]
        raise DataError(f"--lung-crop given: {int((~has).sum())} of {len(df)} images have no lung mask (e.g. "
                        f"{first}); blacking them out would give their class away. Use data with a lung mask for "
                        f"every image, or --lung-crop SEGMENTER to crop with predicted masks (a --task segment "
                        f"--target lung run).")
    return df.assign(**{CROP_COLUMN: df["lung_mask"]})


def copy_segmenter(loc: A.Located, dest_home: Path) -> Path:
    """Copy the segmenter's model.keras and card into ``dest_home/lung_segmenter``."""
    dest = dest_home / A.SEGMENTER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(loc.keras_path, dest / A.EXPORT_MODEL)
    loc.card.save(dest)
    return dest


def predicted_masks(df: pd.DataFrame, segmenter_dir: Path, image_size: int, out_dir: Path,
                    batch_size: int = 16, log=print) -> pd.DataFrame:
    """The manifest with a ``crop_mask`` column: the segmenter's masks for every row as PNGs at
    ``image_size`` in ``out_dir``; '' where the image could not be read."""
    seg = Predictor(segmenter_dir, batch_size=batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [""] * len(df)
    log(f"lung crop: predicting lung masks for {len(df)} images with {segmenter_dir} ...")
    items = [Item(p, key=i) for i, p in enumerate(df["path"])]
    empty = 0
    for batch in seg.run(items):
        for d, probs in zip(batch.done, batch.masks if batch.masks is not None else []):
            mask = P.mask_from_probs(probs, image_size)
            empty += not mask.any()
            dest = out_dir / f"{d.item.key:06d}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(dest)
            files[d.item.key] = str(dest.absolute())
    if empty:
        log(f"WARNING: the segmenter found no lung in {empty} image(s); they are classified as black images")
    return df.assign(**{CROP_COLUMN: files})

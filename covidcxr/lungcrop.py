"""Lung-cropped classification: the X-ray multiplied by its lung mask before the classifier.

The papers on these datasets compare whole-image with segmented-lung classification.
``train --lung-crop given`` uses the lung masks that come with the data (every image must
have one: blacking out the images without one would hand the label to the model);
``train --lung-crop SEGMENTER`` uses the masks a lung segmentation model (a ``--task segment
--target lung`` run or export) predicts, for every image. The segmenter is copied into the
run (``lung_segmenter/``) and into the export, whose SavedModel runs it before the
classifier, so a served model needs nothing but the image.

One definition of the predicted crop mask everywhere (training, evaluation, prediction,
serving): the segmenter's probabilities at its own resolution, resized bilinearly to the
classifier's input size, thresholded at 0.5.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError, DataError

SEGMENTER_DIR = "lung_segmenter"
CROP_COLUMN = "crop_mask"


def mode(labels_doc: dict) -> str:
    """'' (whole image), 'given' or 'model' from a labels doc (old runs stored a bool)."""
    v = labels_doc.get("lung_crop") or ""
    return "given" if v is True else ("" if v is False else str(v))


def check_segmenter(path: str | Path) -> None:
    """Refuse, before any work, a --lung-crop path that is not a lung segmenter (reads labels.json only)."""
    path = Path(path)
    labels = (path if path.is_dir() else path.parent) / "labels.json"
    if not labels.exists():
        raise ConfigError(f"--lung-crop {path}: no labels.json there; pass 'given' or a lung segmentation run or "
                          f"export directory (python -m covidcxr.train --task segment --target lung).")
    doc = json.loads(labels.read_text())
    task, target = doc.get("task", "classify"), doc.get("target", "lung")
    if task == "classify" or target != "lung":
        raise ConfigError(f"--lung-crop {path}: not a lung segmentation model (task {task}, target {target}); "
                          f"train one with python -m covidcxr.train --task segment --target lung.")


def load_segmenter(path: str | Path):
    """A lung segmentation (or multi-task) run/export/.keras -> (model, labels doc)."""
    from covidcxr.export import find_model

    model, labels = find_model(path)
    task, target = labels.get("task", "classify"), labels.get("target", "lung")
    if task == "classify" or target != "lung":
        raise ConfigError(f"--lung-crop {path}: not a lung segmentation model (task {task}, target {target}); "
                          f"train one with python -m covidcxr.train --task segment --target lung.")
    return model, labels


def seg_probs(model, x):
    import tensorflow as tf

    out = model(x, training=False)
    return tf.cast(out["mask"] if isinstance(out, dict) else out, tf.float32)


def mask_from_probs(probs, size: int):
    """[B, h, w, 1] probabilities -> [B, size, size, 1] float {0, 1} crop mask."""
    import tensorflow as tf

    return tf.cast(tf.image.resize(probs, (size, size), method="bilinear") >= 0.5, tf.float32)


def predict_masks(df: pd.DataFrame, model, labels: dict, size: int, out_dir: Path, batch_size: int = 16) -> list[str]:
    """Crop masks for every row as PNGs at ``size`` px in ``out_dir``; '' for unreadable images."""
    import tensorflow as tf

    from covidcxr.data import preprocess as P
    from covidcxr.data.pipeline import load_examples

    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(set(df["label"]))
    ds = load_examples(df.assign(_i=range(len(df))), names, labels["image_size"], labels.get("contrast", "none"))
    ds = ds.map(lambda e: (P.normalize(tf.cast(e["image"], tf.float32) / 255.0, labels["normalization"]), e["path"]))
    paths = {}
    for x, p in ds.batch(batch_size):
        masks = mask_from_probs(seg_probs(model, x), size).numpy()[..., 0]
        for m, path in zip(masks, p.numpy()):
            paths[path.decode()] = m
    files = []
    for i, path in enumerate(df["path"]):
        if path not in paths:
            files.append("")
            continue
        dest = out_dir / f"{i:06d}.png"
        tf.io.write_file(str(dest), tf.io.encode_png((paths[path][..., None] * 255).astype(np.uint8)))
        files.append(str(dest.absolute()))
    return files


def prepare(df: pd.DataFrame, crop: str, image_size: int, run_dir: Path) -> pd.DataFrame:
    """The manifest with a ``crop_mask`` column for ``--lung-crop given|SEGMENTER``; copies the
    segmenter into the run. Refuses 'given' when any image lacks a lung mask."""
    if crop == "given":
        has = df["lung_mask"].astype(str) != "" if "lung_mask" in df else pd.Series(False, index=df.index)
        if not has.all():
            first = df["path"][~has].iloc[0]
            raise DataError(f"--lung-crop given: {int((~has).sum())} of {len(df)} images have no lung mask "
                            f"(e.g. {first}); blacking them out would give their class away. Use data with a lung "
                            f"mask for every image, or --lung-crop SEGMENTER to crop with predicted masks "
                            f"(a --task segment --target lung run).")
        return df.assign(**{CROP_COLUMN: df["lung_mask"]})
    model, labels = load_segmenter(crop)
    dest = run_dir / SEGMENTER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    model.save(dest / "model.keras")
    (dest / "labels.json").write_text(json.dumps(labels, indent=2))
    print(f"lung crop: predicting lung masks for {len(df)} images with {crop} ...", flush=True)
    files = predict_masks(df, model, labels, image_size, run_dir / "crop_masks")
    out = df.assign(**{CROP_COLUMN: files})
    bad = out[CROP_COLUMN] == ""
    if bad.any():
        print(f"WARNING: {int(bad.sum())} unreadable image(s) left out (no crop mask)")
        out = out[~bad].reset_index(drop=True)
    empty = [p for p in out[CROP_COLUMN] if not _nonempty(p)]
    if empty:
        print(f"WARNING: the segmenter found no lung in {len(empty)} image(s); they are classified as black images")
    return out


def _nonempty(path: str) -> bool:
    from PIL import Image

    return bool(np.asarray(Image.open(path)).any())


def find_segmenter(home: Path):
    """The segmenter stored beside a lung-crop model (run or export directory)."""
    for d in (home / SEGMENTER_DIR, home.parent / SEGMENTER_DIR, home.parent.parent / SEGMENTER_DIR):
        if (d / "model.keras").exists():
            return load_segmenter(d)
    raise DataError(f"{home}: this classifier was trained on lung-cropped images but its {SEGMENTER_DIR}/ "
                    f"folder is missing; copy it from the run directory.")


def copy_segmenter(run_or_home: Path, dest: Path) -> None:
    src = run_or_home / SEGMENTER_DIR
    if src.exists():
        shutil.copytree(src, dest / SEGMENTER_DIR, dirs_exist_ok=True)


def crop_one(gray01: np.ndarray, labels: dict, segmenter=None, mask_path: str | None = None) -> np.ndarray:
    """One image [H, W] in [0, 1] -> the classifier's cropped [S, S, 1] float input before
    normalisation (as in training): given mask file, or the segmenter's mask."""
    import tensorflow as tf

    from covidcxr.data import preprocess as P

    size = labels["image_size"]
    img = tf.cast(P.prepare(tf.constant(gray01[..., None], tf.float32), size, labels.get("contrast", "none")),
                  tf.float32) / 255.0
    how = mode(labels)
    if not how:
        return img.numpy()
    if how == "given":
        if not mask_path:
            raise DataError("this classifier was trained on lung-cropped images (given masks): it needs the lung "
                            "mask of each image (predict --lung-masks DIR).")
        mask = P.decode_mask(tf.io.read_file(str(mask_path)))
        mask = tf.image.resize(mask, (size, size), method="nearest")
    else:
        seg, sl = segmenter
        x = P.normalize(tf.cast(P.prepare(tf.constant(gray01[..., None], tf.float32), sl["image_size"],
                                          sl.get("contrast", "none")), tf.float32)[None] / 255.0, sl["normalization"])
        mask = mask_from_probs(seg_probs(seg, x), size)[0]
    return (img * mask).numpy()

"""Evaluate a trained model: ``python -m covidcxr.evaluate --model PATH --data DIR|manifest.csv``.

PATH is a run directory, an export directory, a ``.keras`` file or a SavedModel
directory. Writes, into ``--out`` (default ``<run or model dir>/eval-<split>``):

  metrics.json      every figure (schema below), with 95% bootstrap intervals
  predictions.csv   path, true_label, pred_label, prob_<class>... (one row per image)
  confusion_matrix.png  roc.png  pr.png  reliability.png  examples.png
  gradcam.png + gradcam/<class>/*.png   training_curves.png (run directories)
  calibration.json  the temperature fitted on the validation split (predict --calibrated)
  report.html       all of it on one self-contained page

Segmentation and multi-task models: ``segmentation`` in metrics.json (Dice, IoU, HD95,
mean and per class of image, scored at each ground-truth mask's own size) and
segmentation.png + overlays/<class>/*.png (prediction red, truth green); a multi-task
model also gets every classification figure above (from its ``label`` output).

The report is written to ``OUT.partial`` and renamed only when complete.
Also callable from Python: ``evaluate(model, dataset, class_names) -> dict``.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError, CovidCXRError, DataError, RunExistsError

SCHEMA = "covidcxr.evaluate/1"
TTA_VIEWS = ((0.0, 1.0), (5.0, 1.0), (-5.0, 1.0), (0.0, 1.08))  # (degrees, zoom); no flips (see AugmentConfig)


# ----------------------------------------------------------------- figures


def figures(y: np.ndarray, probs: np.ndarray, class_names: list[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """Every classification figure for true indices ``y`` and probabilities ``probs``."""
    from sklearn.metrics import roc_auc_score

    from covidcxr.calibration import ece, nll, reliability_bins
    from covidcxr.metrics import bootstrap_ci, classification_metrics, cosine_similarity

    m = classification_metrics(y, probs, class_names)
    m["cosine_similarity"] = cosine_similarity(y, probs)
    m["ece"] = ece(y, probs)
    m["nll"] = nll(np.asarray(y, int), np.asarray(probs, np.float64)) if len(y) else None
    onehot = np.eye(len(class_names))[np.asarray(y, int)]
    m["micro_auc"] = (float(roc_auc_score(onehot.ravel(), np.asarray(probs, np.float64).ravel()))
                      if len(y) and 0 < onehot.sum() < onehot.size else None)
    m["reliability"] = reliability_bins(y, np.asarray(probs, np.float64))
    if bootstrap:
        m["ci95"] = bootstrap_ci(y, probs, class_names, n=bootstrap, seed=seed)
    return m


def evaluate(model, dataset, class_names: list[str], bootstrap: int = 0, seed: int = 0) -> dict:
    """Python entry point: a Keras model and a dataset of (x, y[, w]) batches (y one-hot or
    indices) -> the figures dict (accuracy, macro_f1, macro_auc, ece, per_class, ...)."""
    import keras

    ys, ps = [], []
    for batch in dataset:
        x, y = batch[0], batch[1]
        out = model(x, training=False)
        if isinstance(out, dict):
            out, y = out["label"], y["label"]
        p = keras.ops.convert_to_numpy(out).astype(np.float64)
        y = keras.ops.convert_to_numpy(y)
        ys.append(np.argmax(y, axis=-1) if y.ndim == 2 else y.astype(int))
        ps.append(p)
    if not ps:
        raise DataError("the dataset is empty: nothing to evaluate.")
    return figures(np.concatenate(ys), np.concatenate(ps), class_names, bootstrap, seed)


# ----------------------------------------------------------------- model and data


class LoadedModel:
    """A Keras model (with its labels doc) or, failing that, a SavedModel signature."""

    def __init__(self, path: str | Path):
        from covidcxr.predict import Predictor

        self.path = Path(path)
        p = Predictor(path)
        if p.labels is None:
            raise DataError(f"{path}: no labels.json found; cannot tell the model's classes.")
        self.labels, self.kind = p.labels, p.kind
        self.model = getattr(p, "model", None)
        self.fn = getattr(p, "fn", None)
        self.run_dir = self.path if (self.path / "config.json").exists() and self.path.is_dir() else None
        self.home = self.path if self.path.is_dir() else self.path.parent
        self.task = self.labels.get("task", "classify")
        self.target = self.labels.get("target", "lung")
        from covidcxr import lungcrop

        self.crop = lungcrop.mode(self.labels) if self.task == "classify" else ""
        self.segmenter = p.segmenter if self.crop else None  # loaded once, by the Predictor
        self._crop_masks: dict[str, str] = {}  # image path -> predicted crop mask file
        self._crop_dir = None

    def crop_masks(self, df: pd.DataFrame) -> list[str]:
        """Predicted crop-mask files for the rows (computed once per image)."""
        import tempfile

        from covidcxr import lungcrop

        todo = df[~df["path"].isin(self._crop_masks)].reset_index(drop=True)
        if len(todo):
            if self._crop_dir is None:
                self._crop_dir = Path(tempfile.mkdtemp(prefix="covidcxr-crop-"))
            sub = self._crop_dir / str(len(self._crop_masks))
            files = lungcrop.predict_masks(todo, *self.segmenter, self.labels["image_size"], sub)
            self._crop_masks.update(zip(todo["path"], files))
        return [self._crop_masks.get(p, "") for p in df["path"]]

    @property
    def classes(self) -> list[str]:
        return list(self.labels["classes"])


def load_data(data: str | Path, seed: int = 42) -> tuple[pd.DataFrame, str, bool]:
    """(manifest, description, has_own_split) from a dataset folder or a manifest CSV."""
    from covidcxr.data.manifest import build_manifest, read_manifest

    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder.")
    if data.is_file():
        return read_manifest(data), f"manifest {data}", True
    df, rep = build_manifest(data, (0.7, 0.15, 0.15), seed=seed, progress=sys.stderr.isatty())
    own = rep.split_source.startswith("dataset's own split")
    for p in rep.problems:
        print(f"  skipped: {p}", file=sys.stderr)
    return df, f"{rep.layout} folder {rep.root} ({rep.split_source})", own


def choose_split(df: pd.DataFrame, split: str, has_split: bool) -> tuple[pd.DataFrame, str]:
    counts = df["split"].value_counts().to_dict() if has_split else {}
    if split == "auto":
        split = "all" if not has_split else next((s for s in ("test", "val") if counts.get(s)), "all")
    if split == "all":
        return df.reset_index(drop=True), "all"
    if not has_split:
        raise DataError(f"--split {split}: the data has no split of its own (a plain folder); use --split all, "
                        f"or pass a manifest written by `python -m covidcxr.data index`.")
    sub = df[df["split"] == split].reset_index(drop=True)
    if sub.empty:
        raise DataError(f"--split {split} is empty in this data (splits present: "
                        f"{', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'}).")
    return sub, split


def check_classes(df: pd.DataFrame, classes: list[str]) -> list[str]:
    """Refuse data the model cannot be scored on; return warnings for classes the data lacks."""
    data_classes = sorted(df["label"].unique())
    unknown = [c for c in data_classes if c not in classes]
    if not set(data_classes) & set(classes):
        raise DataError(f"the data's classes {data_classes} are none of the model's classes {classes}; "
                        f"is this the right model for this data?")
    if unknown:
        raise DataError(f"the data has classes the model does not know: {unknown} (model: {classes}). "
                        f"Evaluate on a manifest without them, or use a model trained on these classes.")
    missing = [c for c in classes if c not in data_classes]
    return [f"the data has no images of {missing}; their AUC is undefined and they count as 0 in macro recall"] \
        if missing else []


def predict_outputs(lm: LoadedModel, df: pd.DataFrame, batch_size: int = 32, view=None, mask_lungs: bool = False):
    """Run the model on every row -> (rows kept, probabilities [n, K] or None, masks [n, h, w]
    at model resolution or None, skipped paths with reasons). ``view``: (degrees, zoom) fixed
    transform (TTA); ``mask_lungs``: black out the lung mask."""
    import tensorflow as tf

    from covidcxr.data import preprocess as P
    from covidcxr.data.pipeline import affine_batch, load_examples

    task, k = lm.task, len(lm.classes)
    mask_col, pre_skipped = "lung_mask", []
    if lm.crop:
        if mask_lungs:
            raise ConfigError("--mask-lungs: this classifier was trained on lung-cropped images; it sees nothing "
                              "but the lungs, so the shortcut probe does not apply.")
        if lm.crop == "given":
            has = (df["lung_mask"].astype(str) != "") if "lung_mask" in df else pd.Series(False, index=df.index)
            pre_skipped = [f"{p}: no lung mask, and this classifier classifies lung-cropped images (given masks)"
                           for p in df["path"][~has]]
            df = df[has].reset_index(drop=True)
        elif lm.kind == "keras":
            df = df.assign(crop_mask=lm.crop_masks(df))
            mask_col = "crop_mask"
    if lm.kind == "savedmodel":
        if view is not None or mask_lungs:
            raise ConfigError("test-time augmentation and --mask-lungs need the Keras model; pass the run or "
                              "export directory (with model.keras) instead of the bare SavedModel.")
        probs, masks, keep, skipped = [], [], [], []
        for i, path in enumerate(df["path"]):
            try:
                feed = {"image_bytes": tf.reshape(tf.io.read_file(path), [1])}
                if lm.crop == "given":
                    feed["lung_mask_bytes"] = tf.reshape(tf.io.read_file(df["lung_mask"][i]), [1])
                res = lm.fn(**feed)
            except Exception as exc:  # one bad file never stops an evaluation
                skipped.append(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            keep.append(i)
            if task != "segment":
                probs.append(res["probabilities"].numpy()[0])
            if task != "classify":
                masks.append(res["mask"].numpy()[0])
        kept = df.iloc[keep].reset_index(drop=True)
        return (kept, np.asarray(probs, np.float64).reshape(-1, k) if task != "segment" else None,
                np.asarray(masks, np.float32) if task != "classify" else None, pre_skipped + skipped)

    L = lm.labels
    # A segmenter scores images of any class; the pipeline only needs each label to have an index.
    names = lm.classes if task != "segment" else sorted(set(df["label"]) | set(lm.classes))
    ds = load_examples(df, names, L["image_size"], L.get("contrast", "none"), mask_col).batch(batch_size)

    def finish(e):
        img = tf.cast(e["image"], tf.float32) / 255.0
        if lm.crop:  # as in training: the image times its lung mask
            img = img * tf.cast(e["mask"], tf.float32)
        if mask_lungs:
            img = img * (1.0 - tf.cast(e["mask"], tf.float32))
        if view is not None and (view[0] or view[1] != 1.0):
            img = affine_batch(img, np.deg2rad(view[0]), view[1])
        return P.normalize(img, L.get("normalization", "unit")), e["path"]

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    probs, masks, paths = [], [], []
    for x, p in ds:
        out = lm.model(x, training=False)
        if isinstance(out, dict):
            probs.append(np.asarray(out["label"], np.float64))
            masks.append(np.asarray(out["mask"], np.float32)[..., 0])
        elif task == "segment":
            masks.append(np.asarray(out, np.float32)[..., 0])
        else:
            probs.append(np.asarray(out, np.float64))
        paths += [v.decode() for v in p.numpy()]
    size = L["image_size"]
    probs = (np.concatenate(probs) if probs else np.zeros((0, k))) if task != "segment" else None
    masks = (np.concatenate(masks) if masks else np.zeros((0, size, size), np.float32)) if task != "classify" \
        else None
    pos = {p: i for i, p in enumerate(df["path"])}
    kept = df.iloc[[pos[p] for p in paths]].reset_index(drop=True)
    skipped = [f"{p}: unreadable image (decode failed); left out" for p in sorted(set(df["path"]) - set(paths))]
    return kept, probs, masks, pre_skipped + skipped


def predict_frame(lm: LoadedModel, df: pd.DataFrame, batch_size: int = 32, view=None,
                  mask_lungs: bool = False) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Class probabilities for every row -> (rows kept, probabilities [n, K], skipped)."""
    if lm.task == "segment":
        raise ConfigError("a segmentation model has no class probabilities.")
    kept, probs, _, skipped = predict_outputs(lm, df, batch_size, view, mask_lungs)
    return kept, probs, skipped


def score_masks(lm: LoadedModel, kept: pd.DataFrame, masks: np.ndarray, out: Path, n_overlays: int,
                seed: int) -> dict:
    """Dice, IoU and HD95 of the predicted masks against the ground truth (target column), scored at
    each ground-truth mask's own resolution; overlay PNGs for up to n images."""
    from covidcxr.data.imageio import read_image, read_mask
    from covidcxr.masks import overlay, to_size
    from covidcxr.plots import plot_image_grid
    from covidcxr.segmetrics import segmentation_metrics

    col = f"{lm.target}_mask"
    has = (kept[col].astype(str) != "").to_numpy() if col in kept else np.zeros(len(kept), bool)
    idx = np.flatnonzero(has)
    truths, preds, labels, used = [], [], [], []
    for i in idx:
        try:
            t = read_mask(kept[col][i])
        except Exception as exc:
            print(f"  skipped mask: {exc}", file=sys.stderr)
            continue
        truths.append(t)
        preds.append(to_size(masks[i], *t.shape))
        labels.append(kept["label"][i])
        used.append(i)
    if not used:
        return {"n": 0, "target": lm.target, "note": f"no {lm.target} masks in the evaluated images"}
    m = segmentation_metrics(truths, [p.astype(np.float32) for p in preds], labels)
    per_image = m.pop("per_image")
    m.update(target=lm.target, threshold=0.5, scored_at="each ground-truth mask's own resolution (prediction "
             "resized bilinearly from the model's output, then thresholded at 0.5); HD95 in those pixels")
    files, rows = [], []
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)
    per_class = max(1, int(np.ceil(n_overlays / max(1, len(set(labels)))))) if n_overlays else 0
    for c in sorted(set(labels)):
        pos = np.flatnonzero(lab == c)
        if not per_class:
            break
        pick = np.sort(rng.choice(pos, size=min(per_class, len(pos)), replace=False))
        (out / "overlays" / c).mkdir(parents=True, exist_ok=True)
        items = []
        for j in pick:
            from PIL import Image

            path = kept["path"][used[j]]
            gray = read_image(path)
            t = truths[j]
            if t.shape != gray.shape:  # e.g. Kaggle: 256 px masks for 299 px images
                t = read_mask(kept[col][used[j]], (gray.shape[1], gray.shape[0]))
            pic = overlay(gray, to_size(masks[used[j]], *gray.shape), t)
            name = f"overlays/{c}/{Path(path).stem}.png"
            Image.fromarray(pic).save(out / name)
            files.append(name)
            items.append((pic, f"{Path(path).name[:22]}\nDice {per_image['dice'][j]:.3f}", "black"))
        rows.append((c, items))
    if rows:
        plot_image_grid(rows, out / "segmentation.png",
                        f"{lm.target} masks: prediction red, ground truth green")
    m["overlays"] = files
    return m


# ----------------------------------------------------------------- the run


def _label_index(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    look = {c: i for i, c in enumerate(classes)}
    return np.array([look[c] for c in df["label"]], int)


def _fit_temperature(lm, df_all, has_split, split, batch_size, seed):
    """Temperature from the validation split of the data, else of the run's own manifest."""
    from covidcxr.calibration import fit_temperature

    source, val = None, None
    if has_split and (df_all["split"] == "val").any():
        val, source = df_all[df_all["split"] == "val"].reset_index(drop=True), "validation split of the data"
    elif lm.run_dir is not None and (lm.run_dir / "manifest.csv").exists():
        man = pd.read_csv(lm.run_dir / "manifest.csv", dtype=str, keep_default_na=False)
        man = man[(man["split"] == "val") & man["label"].isin(lm.classes)]
        man = man[[Path(p).exists() for p in man["path"]]]
        if len(man):
            val, source = man.reset_index(drop=True), f"validation split of the run ({lm.run_dir / 'manifest.csv'})"
    if val is None:
        return None, "no validation split in the data or the run: temperature not fitted"
    kept, probs, _ = predict_frame(lm, val, batch_size)
    if len(kept) < 2:
        return None, "validation split too small: temperature not fitted"
    t = fit_temperature(_label_index(kept, lm.classes), probs)
    note = source + (" (the evaluated split itself: the calibrated ECE is optimistic)" if split == "val"
                     and source.startswith("validation split of the data") else "")
    return (t, len(kept)), note


def _gradcam(lm, df, y, probs, classes, n_per_class, layer, out: Path, seed: int) -> dict:
    """Overlays for up to n images per true class (predicted class explained)."""
    from covidcxr.data.imageio import read_image
    from covidcxr.data import preprocess as P
    from covidcxr.gradcam import GradCAM, overlay
    from covidcxr.lungcrop import crop_one
    from covidcxr.plots import plot_image_grid

    import tensorflow as tf

    cam = GradCAM(lm.model, layer)
    L = lm.labels
    rng = np.random.default_rng(seed)
    rows, files = [], []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(y == i)
        if not len(idx):
            continue
        pick = np.sort(rng.choice(idx, size=min(n_per_class, len(idx)), replace=False))
        items = []
        (out / "gradcam" / c).mkdir(parents=True, exist_ok=True)
        for j in pick:
            gray = read_image(df["path"][j])
            mask_path = df["crop_mask"][j] if "crop_mask" in df else (df["lung_mask"][j] if "lung_mask" in df else None)
            img01 = crop_one(gray, L, lm.segmenter, mask_path if lm.crop == "given" else None)
            x = P.normalize(tf.constant(img01)[None], L.get("normalization", "unit"))
            heat, _ = cam.heatmaps(x)
            shown = img01[..., 0]
            ov = overlay(shown, heat[0])
            k = int(probs[j].argmax())
            name = Path(df["path"][j]).stem + ".png"
            from PIL import Image

            Image.fromarray(overlay(gray, heat[0])).save(out / "gradcam" / c / name)
            files.append(f"gradcam/{c}/{name}")
            items.append((ov, f"{Path(df['path'][j]).name[:22]}\npred {classes[k]} {probs[j, k]:.2f}",
                          "green" if k == i else "red"))
        rows.append((f"true {c}", items))
    plot_image_grid(rows, out / "gradcam.png", f"Grad-CAM (layer {cam.layer_name}), explaining the predicted class")
    return {"layer": cam.layer_name, "files": files}


def _examples(df, y, probs, classes, out: Path, n: int = 4, seed: int = 0) -> Path:
    from covidcxr.data.imageio import read_image
    from covidcxr.plots import plot_image_grid

    rng = np.random.default_rng(seed)
    pred = probs.argmax(axis=1)
    rows = []
    for i, c in enumerate(classes):
        for ok in (True, False):
            idx = np.flatnonzero((y == i) & ((pred == i) == ok))
            if not len(idx):
                continue
            pick = np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))
            items = []
            for j in pick:
                try:
                    img = read_image(df["path"][j])
                except Exception:
                    continue
                k = int(pred[j])
                items.append((img, f"pred {classes[k]} {probs[j, k]:.2f}\np({c})={probs[j, i]:.2f}",
                              "green" if ok else "red"))
            rows.append((f"{c}: {'right' if ok else 'wrong'}", items))
    return plot_image_grid(rows, out / "examples.png", "Correctly (green) and wrongly (red) classified examples")


def _probe_verdict(normal: dict, masked: dict, k: int) -> str:
    auc_n, auc_m = normal.get("macro_auc"), masked.get("macro_auc")
    if auc_n is None or auc_m is None:
        return "not enough classes with lung masks to compare AUCs."
    retained = (auc_m - 0.5) / (auc_n - 0.5) if auc_n > 0.5 else float("nan")
    base = (f"with the lung fields blacked out: macro-AUC {auc_m:.3f} (vs {auc_n:.3f} with them), accuracy "
            f"{masked['accuracy']:.3f} (chance {1 / k:.3f})")
    if auc_m >= 0.7 or (np.isfinite(retained) and retained >= 0.5):
        return (f"WARNING: {base}. The model keeps {retained:.0%} of its above-chance AUC without the lungs: it leans "
                f"on what lies outside them (text, devices, borders, body habitus), a known shortcut in COVID CXR "
                f"datasets. Treat its figures with caution.")
    return f"OK: {base}. Without the lungs the model drops towards chance, as it should."


def run(model_path: str, data: str, split: str = "auto", out: str | None = None, bootstrap: int = 1000,
        seed: int = 0, tta: bool = False, mask_lungs: bool = False, gradcam: int = 4,
        gradcam_layer: str | None = None, batch_size: int = 32, overwrite: bool = False,
        overlays: int = 8) -> Path:
    t0 = time.perf_counter()
    lm = LoadedModel(model_path)
    classes = lm.classes
    df_all, data_desc, has_split = load_data(data)
    df, split = choose_split(df_all, split, has_split)
    if lm.task == "segment":
        warnings = []
        col = f"{lm.target}_mask"
        has = df[col].astype(str) != "" if col in df else pd.Series(False, index=df.index)
        if not has.any():
            raise DataError(f"this {lm.target} segmentation model needs {lm.target} masks to be scored, and no image "
                            f"of split '{split}' has one ({col} is empty). Use data with {lm.target} masks.")
        df = df[has].reset_index(drop=True)
    else:
        warnings = check_classes(df, classes)
    out = Path(out) if out else lm.home / f"eval-{split}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or another --out.")
    if mask_lungs and lm.crop:
        warnings.append("--mask-lungs skipped: this classifier was trained on lung-cropped images and sees only "
                        "the lungs anyway.")
        mask_lungs = False
    if gradcam and lm.task != "classify":
        if lm.task == "multitask":
            warnings.append("Grad-CAM is drawn for classifiers; the multi-task model's figures have no heatmaps.")
        gradcam = 0
    if gradcam and lm.kind != "keras":
        warnings.append("Grad-CAM needs the Keras model; a bare SavedModel was given, so no heatmaps.")
        gradcam = 0
    if gradcam:  # fail before the long part when the layer is wrong
        from covidcxr.gradcam import GradCAM

        GradCAM(lm.model, gradcam_layer)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _run(lm, classes, df_all, df, split, has_split, data_desc, tmp, bootstrap, seed, tta, mask_lungs, gradcam,
             gradcam_layer, batch_size, warnings, model_path, data, overwrite, overlays)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"evaluation written to {out} ({time.perf_counter() - t0:.0f} s); open {out / 'report.html'}")
    return out


def _run(lm, classes, df_all, df, split, has_split, data_desc, out, bootstrap, seed, tta, mask_lungs, gradcam,
         gradcam_layer, batch_size, warnings, model_path, data, overwrite, overlays=8):
    from covidcxr.plots import plot_history

    what = f"classes {classes}" if lm.task != "segment" else f"{lm.target} segmentation"
    print(f"evaluating {model_path} ({lm.kind}, {lm.task}, {what}) on {len(df)} images of split '{split}' "
          f"from {data_desc}")
    kept, probs, masks, skipped = predict_outputs(lm, df, batch_size)
    if not len(kept):
        raise DataError(f"none of the {len(df)} images could be read; nothing to evaluate.")
    m = {"schema": SCHEMA, "model": str(model_path), "model_kind": lm.kind, "task": lm.task, "data": str(data),
         "split": split, "classes": classes}
    if lm.task != "segment":
        _classification(m, lm, classes, kept, probs, df_all, has_split, split, out, bootstrap, seed, tta,
                        mask_lungs, batch_size, skipped, warnings)
    else:
        m.update(n=int(len(kept)), skipped=skipped, warnings=warnings)
    if lm.task != "classify":
        seg = score_masks(lm, kept, masks, out, overlays, seed)
        m["segmentation"] = seg
        if seg["n"]:
            hd = "n/a" if seg["hd95"] is None else f"{seg['hd95']:.2f} px"
            print(f"{lm.target} masks (n={seg['n']}): Dice {seg['dice']:.4f}, IoU {seg['iou']:.4f}, HD95 {hd}; "
                  + ", ".join(f"{c} Dice {v['dice']:.3f}" for c, v in seg["per_class"].items()))
        else:
            warnings.append(seg["note"])
    if lm.run_dir is not None and (lm.run_dir / "history.csv").exists():
        plot_history(lm.run_dir / "history.csv", out / "training_curves.png")
    m["gradcam"] = None
    if lm.task == "classify" and gradcam:
        m["gradcam"] = _gradcam(lm, kept, _label_index(kept, classes), probs, classes, gradcam, gradcam_layer, out,
                                seed)
    m["data_summary"] = data_summary(df_all, df, has_split, skipped)
    m["model_config"] = model_config(lm)
    (out / "metrics.json").write_text(json.dumps(m, indent=2, default=_json_default))
    write_report(out, m)
    fitted = (m.get("calibration") or {}).get("temperature")
    # The temperature beside the model, for `predict --calibrated` (never replacing one silently).
    if fitted is not None and lm.home.is_dir():
        dest = lm.home / "calibration.json"
        if not dest.exists() or overwrite:
            shutil.copy(out / "calibration.json", dest)
            print(f"temperature {fitted:.4f} saved to {dest} (predict --calibrated uses it)")
        else:
            print(f"note: {dest} exists; kept it (pass --overwrite to replace it with this fit)")


def _classification(m, lm, classes, kept, probs, df_all, has_split, split, out, bootstrap, seed, tta, mask_lungs,
                    batch_size, skipped, warnings):
    """The classification figures and plots into ``m`` and ``out``."""
    from covidcxr.calibration import apply_temperature, ece, reliability_bins, save_temperature
    from covidcxr.plots import plot_confusion, plot_pr, plot_reliability, plot_roc

    y = _label_index(kept, classes)
    m.update(figures(y, probs, classes, bootstrap, seed))
    m["bootstrap"] = {"replicates": bootstrap, "seed": seed, "stratified": True} if bootstrap else None
    m["skipped"] = skipped
    m["warnings"] = warnings

    # predictions.csv: full float precision so metrics.json can be recomputed from it exactly.
    pred = pd.DataFrame({"path": kept["path"], "true_label": kept["label"],
                         "pred_label": [classes[i] for i in probs.argmax(axis=1)]})
    for i, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, i]
    pred.to_csv(out / "predictions.csv", index=False, float_format="%.17g")

    # Calibration.
    fitted, note = _fit_temperature(lm, df_all, has_split, split, batch_size, seed)
    cal = {"bins": 15, "ece_before": m["ece"], "note": note, "temperature": None, "ece_after": None}
    after = None
    if fitted is not None:
        t, n_fit = fitted
        cal_probs = apply_temperature(probs, t)
        cal.update(temperature=t, n_fit=n_fit, fitted_on=note, ece_after=ece(y, cal_probs))
        after = reliability_bins(y, cal_probs)
        save_temperature(out / "calibration.json", t, note, n_fit, m["ece"], cal["ece_after"])
    m["calibration"] = cal
    plot_reliability(m["reliability"], after, m["ece"], cal["ece_after"], cal["temperature"], out / "reliability.png")
    auc = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
    print(f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, macro-AUC {auc}, ECE {m['ece']:.4f}"
          + (f" -> {cal['ece_after']:.4f} at T={cal['temperature']:.3f}" if fitted else ""))

    if tta:
        views = []
        for v in TTA_VIEWS:
            k2, p2, _ = predict_frame(lm, kept, batch_size, view=v)
            if len(k2) != len(kept):
                raise DataError("test-time augmentation read a different set of images than the plain pass.")
            views.append(p2)
        ptta = np.mean(views, axis=0)
        t_fig = figures(y, ptta, classes, bootstrap, seed)
        m["tta"] = {"views": [{"rotation_deg": a, "zoom": z} for a, z in TTA_VIEWS],
                    **{k: t_fig[k] for k in ("accuracy", "macro_f1", "macro_auc", "ece", "cosine_similarity")},
                    "ci95": t_fig.get("ci95"), "per_class": t_fig["per_class"]}
        print(f"TTA ({len(TTA_VIEWS)} views): accuracy {t_fig['accuracy']:.4f}, macro-F1 {t_fig['macro_f1']:.4f}")
    else:
        m["tta"] = None

    if mask_lungs:
        sub = kept[kept["lung_mask"].astype(str) != ""].reset_index(drop=True) if "lung_mask" in kept else kept[:0]
        if sub.empty:
            m["mask_lungs"] = {"n": 0, "verdict": "no lung masks in this data: the shortcut probe could not run."}
            warnings.append(m["mask_lungs"]["verdict"])
        else:
            k_m, p_m, _ = predict_frame(lm, sub, batch_size, mask_lungs=True)
            pos = {p: i for i, p in enumerate(kept["path"])}
            p_n = probs[[pos[p] for p in k_m["path"]]]
            y_m = _label_index(k_m, classes)
            normal, masked = figures(y_m, p_n, classes), figures(y_m, p_m, classes)
            keys = ("accuracy", "macro_f1", "macro_auc", "ece")
            m["mask_lungs"] = {"n": int(len(k_m)), "classes_with_masks": sorted(k_m["label"].unique().tolist()),
                               "normal": {k: normal[k] for k in keys}, "lungs_masked": {k: masked[k] for k in keys},
                               "verdict": _probe_verdict(normal, masked, len(classes))}
            print("shortcut probe: " + m["mask_lungs"]["verdict"])
    else:
        m["mask_lungs"] = None

    plot_confusion(m["confusion_matrix"], classes, out / "confusion_matrix.png", f"{split} split, n={m['n']}")
    plot_roc(y, probs, classes, out / "roc.png")
    plot_pr(y, probs, classes, out / "pr.png")
    _examples(kept, y, probs, classes, out, seed=seed)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def data_summary(df_all: pd.DataFrame, df: pd.DataFrame, has_split: bool, skipped: list[str]) -> dict:
    out = {"images_evaluated": int(len(df) - len(skipped)), "images_skipped": len(skipped),
           "classes_evaluated": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()}}
    if has_split:
        out["class_by_split"] = {c: {k: int(v) for k, v in g["split"].value_counts().items()}
                                 for c, g in df_all.groupby("label")}
    if "group" in df_all:
        sizes = df_all.groupby("group").size()
        dup = sizes[sizes > 1]
        crossing = sum(1 for g, sub in df_all[df_all["group"].isin(dup.index)].groupby("group")
                       if sub["split"].nunique() > 1)
        out["duplicate_groups"] = int(len(dup))
        out["images_in_duplicate_groups"] = int(dup.sum())
        out["duplicate_groups_crossing_splits"] = int(crossing)
    return out


def model_config(lm: LoadedModel) -> dict:
    cfg = {"labels": lm.labels}
    for cand in ((lm.run_dir / "config.json") if lm.run_dir else None, lm.home / "config.json"):
        if cand is not None and cand.exists():
            cfg["train_config"] = json.loads(cand.read_text())
            break
    return cfg


# ----------------------------------------------------------------- report


def _img(out: Path, name: str, caption: str) -> str:
    p = out / name
    if not p.exists():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _f(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _seg_section(seg: dict) -> str:
    if not seg.get("n"):
        return f"<h2>Segmentation</h2><p>{html.escape(seg.get('note', 'no masks scored'))}</p>"
    rows = [("all images", seg)] + list((seg.get("per_class") or {}).items())
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v['n']}</td><td>{_f(v['dice'])}</td><td>{_f(v['iou'])}</td>"
                   f"<td>{_f(v['hd95'], 2)}</td><td>{v['hd95_undefined']}</td></tr>" for k, v in rows)
    return (f"<h2>Segmentation: {html.escape(seg['target'])} masks</h2><table><tr><th></th><th>images</th>"
            f"<th>Dice</th><th>IoU</th><th>HD95 (px)</th><th>HD95 undefined</th></tr>{body}</table>"
            f"<p><small>Means over images, scored at {html.escape(seg['scored_at'])}. HD95 is undefined when "
            f"exactly one of truth and prediction is empty.</small></p>")


def write_report(out: Path, m: dict) -> Path:
    if "accuracy" not in m:  # a segmentation model: no classification figures
        return _write_page(out, m, "", "", "", _seg_section(m["segmentation"]))
    ci = m.get("ci95") or {}

    def with_ci(key):
        c = ci.get(key)
        return _f(m.get(key)) + (f" <small>[{_f(c['low'])}, {_f(c['high'])}]</small>" if c else "")

    cov = ci.get("covid_class")
    covid_sens = m["per_class"][cov]["sensitivity"] if cov else None
    rows = [("accuracy", with_ci("accuracy")), ("macro F1", with_ci("macro_f1")), ("macro ROC-AUC", with_ci("macro_auc")),
            ("micro ROC-AUC", _f(m.get("micro_auc"))), ("weighted F1", _f(m["weighted_f1"])),
            ("cosine similarity (probabilities vs one-hot)", _f(m["cosine_similarity"])),
            ("ECE (15 bins), uncalibrated", _f(m["ece"])),
            ("ECE after temperature scaling", _f(m["calibration"]["ece_after"]) +
             (f" (T = {m['calibration']['temperature']:.3f})" if m["calibration"]["temperature"] else ""))]
    if cov:
        c = ci.get("covid_sensitivity")
        rows.insert(3, (f"{cov} sensitivity", _f(covid_sens) +
                        (f" <small>[{_f(c['low'])}, {_f(c['high'])}]</small>" if c else "")))
    if m.get("tta"):
        rows.append(("with test-time augmentation: accuracy / macro F1 / macro AUC",
                     f"{_f(m['tta']['accuracy'])} / {_f(m['tta']['macro_f1'])} / {_f(m['tta']['macro_auc'])}"))
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    pc = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{_f(v['precision'])}</td><td>{_f(v['recall'])}</td>"
        f"<td>{_f(v['specificity'])}</td><td>{_f(v['f1'])}</td><td>{_f(v['roc_auc'])}</td>"
        f"<td>{_f(v['average_precision'])}</td><td>{v['support']}</td></tr>" for c, v in m["per_class"].items())
    probe = ""
    if m.get("mask_lungs"):
        ml = m["mask_lungs"]
        probe = f"<h2>Shortcut probe: lungs blacked out</h2><p>{html.escape(ml['verdict'])}</p>"
        if ml.get("n"):
            probe += (f"<p>{ml['n']} images with lung masks (classes {html.escape(', '.join(ml['classes_with_masks']))}).</p>"
                      "<table><tr><th></th><th>accuracy</th><th>macro F1</th><th>macro AUC</th></tr>"
                      + "".join(f"<tr><th>{n}</th><td>{_f(ml[k]['accuracy'])}</td><td>{_f(ml[k]['macro_f1'])}</td>"
                                f"<td>{_f(ml[k]['macro_auc'])}</td></tr>"
                                for n, k in (("lungs visible", "normal"), ("lungs blacked out", "lungs_masked")))
                      + "</table>")
    seg = _seg_section(m["segmentation"]) if m.get("segmentation") else ""
    return _write_page(out, m, head, pc, probe, seg)


def _write_page(out: Path, m: dict, head: str, pc: str, probe: str, seg: str) -> Path:
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in m.get("warnings", []))
    skipped = "".join(f"<li>{html.escape(s)}</li>" for s in m.get("skipped", [])[:50])
    figs = "".join(_img(out, n, c) for n, c in (
        ("confusion_matrix.png", "Confusion matrix"), ("roc.png", "ROC curves"), ("pr.png", "Precision-recall"),
        ("reliability.png", "Reliability diagram"), ("training_curves.png", "Training curves"),
        ("examples.png", "Examples"), ("gradcam.png", "Grad-CAM"),
        ("segmentation.png", "Predicted (red) and true (green) masks")))
    classification = "" if not head else f"""<h2>Figures</h2><table>{head}</table>
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall (sensitivity)</th><th>specificity</th>
<th>F1</th><th>ROC-AUC</th><th>average precision</th><th>support</th></tr>{pc}</table>
{probe}"""
    report = "" if "classification_report" not in m else \
        f"<h2>Classification report</h2><pre>{html.escape(m['classification_report'])}</pre>"
    intervals = (f" Intervals are 95% stratified bootstrap percentile intervals "
                 f"({(m.get('bootstrap') or {}).get('replicates', 0)} replicates)." if head else "")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>covidcxr evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
img{{max-width:100%}}figure{{margin:1.5em 0}}.note{{background:#fff3cd;padding:.8em;border:1px solid #e0c36c}}
pre{{background:#f6f6f6;padding:.8em;overflow:auto}}</style></head><body>
<h1>Evaluation: {html.escape(Path(m['model']).name)} on split '{html.escape(m['split'])}'</h1>
<p class="note"><b>Intended use: research only, not for diagnosis.</b> These figures describe this model on these
images; they do not establish clinical performance.{intervals}</p>
<p>Model: <code>{html.escape(m['model'])}</code> ({m['model_kind']}); data: <code>{html.escape(m['data'])}</code>;
{m['n']} images evaluated, {len(m.get('skipped', []))} skipped.</p>
{f'<ul class="note">{warn}</ul>' if warn else ''}
{classification}
{seg}
<h2>Plots</h2>{figs}
{report}
<h2>Data</h2><pre>{html.escape(json.dumps(m['data_summary'], indent=2))}</pre>
{f'<h3>Skipped files</h3><ul>{skipped}</ul>' if skipped else ''}
<h2>Model configuration</h2><pre>{html.escape(json.dumps(m['model_config'], indent=2))}</pre>
<p><small>covidcxr, metrics.json schema {SCHEMA}.</small></p></body></html>"""
    (out / "report.html").write_text(doc)
    return out / "report.html"


# ----------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run directory, export directory, .keras file or SavedModel")
    p.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    p.add_argument("--split", default="auto", choices=["auto", "train", "val", "test", "all"],
                   help="images to evaluate (default auto: test, else val, else all images of a plain folder)")
    p.add_argument("--out", default=None, help="output folder (default <model dir>/eval-<split>)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and example-picking seed")
    p.add_argument("--tta", action="store_true", help="also report test-time augmentation (4 fixed views)")
    p.add_argument("--mask-lungs", action="store_true",
                   help="shortcut probe: also evaluate with the lung fields blacked out (needs lung masks)")
    p.add_argument("--gradcam", type=int, default=4, help="Grad-CAM overlays per class (0: none)")
    p.add_argument("--gradcam-layer", default=None, help="layer inside the backbone (default: its last block)")
    p.add_argument("--overlays", type=int, default=8,
                   help="segmentation/multi-task: overlay PNGs of predicted vs true masks (0: none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.bootstrap < 0 or args.gradcam < 0 or args.overlays < 0:
            raise ConfigError("--bootstrap, --gradcam and --overlays must be 0 or more.")
        run(args.model, args.data, args.split, args.out, args.bootstrap, args.seed, args.tta, args.mask_lungs,
            args.gradcam, args.gradcam_layer, args.batch_size, args.overwrite, args.overlays)
    except CovidCXRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The machinery of a zero-shot run (``python -m covidcxr.zeroshot``), as a library.

- ``load_rows``: the images to score, from a dataset folder (indexed on the fly) or a manifest,
  with ``--split`` chosen as ``evaluate`` chooses it; files indexing could not read are kept
  as problems so that every unreadable image is listed.
- ``check_family``: a preset must hold the model family the command was asked for (CLIP or
  SigLIP), refused before any weights load, naming both.
- ``decoded_batches``: images decoded on the host by a thread pool (covidcxr.data.preprocess,
  as training and prediction decode them), at most ~3 batches ahead of the model, so memory
  does not grow with the number of files; unreadable ones are collected with their reason.
- ``write_classification``: predictions.csv, the plots, metrics.json and report.html, with the
  same names and keys as ``covidcxr.evaluate``.
- ``SegScores`` / ``overlay_grid``: Dice, IoU and HD95 per image as masks stream by (at each
  ground-truth mask's own resolution, with covidcxr.segmetrics' definitions), summarised as
  ``evaluation.figures.segmentation`` summarises them; a grid of masks over the X-rays.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.artifacts import check_free
from covidcxr.data import preprocess as P
from covidcxr.data.imageio import inspect_file, read_image, read_mask
from covidcxr.data.pool import decode_ahead, default_workers
from covidcxr.errors import ConfigError, DataError
from covidcxr.evaluation import visuals
from covidcxr.evaluation import figures as F
from covidcxr.evaluation.data import EvalData, data_summary, load_data
from covidcxr.evaluation.figures import mean_ci
from covidcxr.evaluation.report import write, write_metrics
from covidcxr.masks import overlay
from covidcxr.models.presets import describe_preset
from covidcxr.plots import plot_confusion, plot_image_grid, plot_pr, plot_reliability, plot_roc
from covidcxr.segmetrics import dice, hd95, iou

FAMILIES = {"clip": ("CLIPBackbone", "CLIP", "clip_vit_base_patch16"),
            "medsiglip": ("SigLIPBackbone", "SigLIP", "medsiglip_900m_448")}


def load_rows(data: str, split: str, quiet: bool = False, seed: int = 42) -> EvalData:
    """The rows of ``data`` (folder or manifest CSV) for ``split`` (auto: test, else val, else all), as
    ``evaluate`` loads external data."""
    return load_data(data, split, seed, progress=not quiet)


def check_family(preset: str, model: str, flag: str = "--preset") -> None:
    """Refuse a preset that does not hold ``model``'s family (``FAMILIES``), or a folder without its tokenizer."""
    if os.path.isdir(preset):
        missing = [f for f in ("config.json", "tokenizer.json") if not os.path.exists(os.path.join(preset, f))]
        if missing:
            raise ConfigError(f"{flag} {preset}: lacks {', '.join(missing)}; a zero-shot preset needs the "
                              f"{FAMILIES[model][1]} backbone and its tokenizer (save_to_preset of both).")
    want, family, example = FAMILIES[model]
    info = describe_preset(preset)
    found = info.cls if info.fmt == "keras" else f"Hugging Face '{info.cls}' checkpoint"
    if found == want:
        return
    other = next((m for m, (cls, *_) in FAMILIES.items() if cls == found), None)
    hint = f"pass --model {other} for this preset, or " if other else "pass "
    raise ConfigError(f"{flag} {preset} holds a {found}, but --model {model} needs a {want} ({family}) preset; "
                      f"{hint}a keras-hub {family} preset (e.g. {example}, or a save_to_preset folder of the "
                      f"backbone and its tokenizer).")


def check_out(out: Path, overwrite: bool) -> None:
    check_free(out, overwrite)



def _decode(path: str, size: int):
    """(uint8 [size, size], (height, width), '') or (None, None, reason); never raises."""
    info = inspect_file(path, keep_gray=True)
    if not info.ok:
        return None, None, info.reason
    try:
        return P.prepare(info.gray, size, "none"), info.gray.shape[:2], ""
    except Exception as exc:  # an odd file: this input only
        return None, None, str(exc).splitlines()[0][:200]


def decoded_batches(paths: list[str], size: int, batch_size: int, failed: list, quiet: bool = False,
                    workers: int | None = None, desc: str = "zero-shot"):
    """Yield (row indices, uint8 ``[n, size, size, 1]``, [(height, width)]) in row order; unreadable files go
    to ``failed`` as (path, reason). Decoding runs ahead in threads, bounded to ~3 batches."""
    from tqdm import tqdm

    workers = workers or default_workers()
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=quiet, delay=2, file=sys.stderr, mininterval=0.5)
    keys, images, sizes = [], [], []
    try:
        decoded = decode_ahead(lambda path: _decode(path, size), paths, 3 * batch_size, workers)
        for k, (img, hw, reason) in enumerate(decoded):
            bar.update(1)
            if reason:
                failed.append((paths[k], reason))
                continue
            keys.append(k)
            images.append(img)
            sizes.append(hw)
            if len(keys) == batch_size:
                yield keys, np.stack(images)[..., None], sizes
                keys, images, sizes = [], [], []
        if keys:
            yield keys, np.stack(images)[..., None], sizes
    finally:
        bar.close()


def nothing_readable(n: int, failed: list[tuple[str, str]]) -> DataError:
    """The error when no image of the split could be decoded (one line, with an example)."""
    eg = f" (e.g. {failed[0][0]}: {failed[0][1]})" if failed else ""
    return DataError(f"none of the {n} images could be read{eg}.")


def finish(out: Path, m: dict, rows: EvalData) -> None:
    """data_summary, metrics.json and report.html (the keys ``evaluation.report.write`` reads)."""
    m["data_summary"] = data_summary(rows.df_all, rows.df, rows.has_split, m["skipped"])
    write_metrics(out, m)
    write(out, m)


def write_classification(out: Path, m: dict, kept: pd.DataFrame, probs: np.ndarray, scores: np.ndarray | None,
                         bootstrap: int, seed: int) -> str:
    """Figures into ``m``; predictions.csv (prob_<class>, and score_<class> for raw sigmoid scores) and the
    plots into ``out``. Returns the plot context ("<split> split, n=<n>")."""
    classes = m["classes"]
    y = F.label_index(kept["label"], classes)
    m.update(F.classification(y, probs, classes, bootstrap, seed))
    m["bootstrap"] = {"replicates": bootstrap, "seed": seed, "stratified": True} if bootstrap else None
    m["calibration"] = {"bins": 15, "ece_before": m["ece"], "ece_after": None, "temperature": None,
                        "note": "zero-shot: no temperature fitted (no labelled data is used)"}
    pred = pd.DataFrame({"path": kept["path"].to_numpy(), "true_label": kept["label"].to_numpy(),
                         "pred_label": [classes[i] for i in probs.argmax(axis=1)]})
    for i, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, i]
    for i, c in enumerate(classes if scores is not None else []):
        pred[f"score_{c}"] = scores[:, i]
    pred.to_csv(out / "predictions.csv", index=False, float_format="%.17g")
    context = f"{m['split']} split, n={m['n']}"
    plot_confusion(m["confusion_matrix"], classes, out / "confusion_matrix.png", "zero-shot", context=context)
    plot_roc(y, probs, classes, out / "roc.png", context=context)
    plot_pr(y, probs, classes, out / "pr.png", context=context)
    plot_reliability(m["reliability"], None, m["ece"], None, None, out / "reliability.png", context=context)
    visuals.examples(kept, y, probs, classes, out, context, seed=seed)
    return context


# ---------------------------------------------------------------- segmentation

# Which ground-truth column a prompt is scored against: prompt-set names first, then words of the prompt.
TARGET_OF_SET = {"lungs": "lung", "opacity": "infection"}
INFECTION_WORDS = ("opacit", "consolidation", "infection", "infiltrat", "ground-glass", "ground glass", "lesion",
                   "pneumonia", "covid")


def seg_target(prompt: str, phrasings: list[str], override: str | None = None) -> str | None:
    """'lung', 'infection' or None (not scored) for a segmentation prompt; ``override`` ('none': None) wins."""
    if override:
        return None if override == "none" else override
    if prompt in TARGET_OF_SET:
        return TARGET_OF_SET[prompt]
    text = " ".join([prompt, *phrasings]).lower()
    if any(w in text for w in INFECTION_WORDS):
        return "infection"
    return "lung" if "lung" in text else None


def check_sam(preset: str) -> None:
    """Refuse (before any weights load) a ``--sam`` preset that is not a keras-hub SAMBackbone."""
    info = describe_preset(preset)
    if info.cls != "SAMBackbone":
        raise ConfigError(f"--sam {preset} holds a {info.cls}, but --sam needs a keras-hub SAM preset (SAMBackbone, "
                          f"e.g. sam_base_sa1b, or a folder written by its save_to_preset).")


def load_sam(preset: str):
    """(SAMImageSegmenter, its input side in pixels) from a keras-hub SAM preset name or folder (wrapped once
    here, so that ``prompted.sam_segment`` does not build a segmenter per batch)."""
    import keras_hub

    check_sam(preset)
    try:
        sam = keras_hub.models.Backbone.from_preset(preset)
    except Exception as exc:
        raise ConfigError(f"--sam {preset}: cannot load a SAM model from it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}). Offline, pass a local preset folder.") from exc
    return keras_hub.models.SAMImageSegmenter(backbone=sam), int(sam.image_encoder.input.shape[1])


class SegScores:
    """Dice, IoU and HD95 per image, added as masks stream by (no mask is kept), summarised with the
    keys of ``evaluation.figures.segmentation`` (n, dice, iou, hd95, hd95_undefined, per_class, ci95)."""

    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []
        self.labels: list[str] = []

    def add(self, truth: np.ndarray, pred: np.ndarray, label: str) -> tuple[float, float, float]:
        """Score one pair (truth: {0, 1} or bool; pred: bool; the same shape); returns (dice, iou, hd95)."""
        t, p = np.asarray(truth) >= 0.5, np.asarray(pred, bool)
        if t.shape != p.shape:
            raise ValueError(f"mask shapes differ: truth {t.shape}, prediction {p.shape}")
        row = (dice(t, p), iou(t, p), hd95(t, p))
        self.rows.append(row)
        self.labels.append(label)
        return row

    @staticmethod
    def _summary(arr: np.ndarray) -> dict:
        h = arr[:, 2][np.isfinite(arr[:, 2])]
        return {"n": int(len(arr)), "dice": float(arr[:, 0].mean()) if len(arr) else None,
                "iou": float(arr[:, 1].mean()) if len(arr) else None,
                "hd95": float(h.mean()) if len(h) else None, "hd95_undefined": int(len(arr) - len(h))}

    def summary(self, bootstrap: int, seed: int) -> dict:
        arr, labels = np.array(self.rows, float).reshape(-1, 3), np.array(self.labels)
        out = self._summary(arr)
        out["per_class"] = {c: self._summary(arr[labels == c]) for c in sorted(set(self.labels))}
        out["ci95"] = ({"dice": mean_ci(arr[:, 0], labels, bootstrap, seed),
                        "iou": mean_ci(arr[:, 1], labels, bootstrap, seed)} if bootstrap else None)
        return out


def overlay_picks(df: pd.DataFrame, eligible: np.ndarray, n: int, seed: int) -> set[int]:
    """Up to ``n`` row indices among ``eligible``, spread evenly over the classes (seeded)."""
    rng, labels = np.random.default_rng(seed), df["label"].to_numpy()
    classes = sorted(set(labels[eligible])) if eligible.any() else []
    per = int(np.ceil(n / max(1, len(classes)))) if n else 0
    picks = set()
    for c in classes:
        idx = np.flatnonzero(eligible & (labels == c))
        picks |= {int(i) for i in rng.choice(idx, size=min(per, len(idx)), replace=False)}
    return picks


def overlay_grid(df: pd.DataFrame, preds: dict[int, np.ndarray], truth_col: str | None, dice: dict[int, float],
                 out: Path, title: str, context: str) -> Path | None:
    """segmentation.png: each picked image with its predicted mask (red) and, where known, the truth (green)."""
    rows: dict[str, list] = {}
    for i in sorted(preds):
        gray = read_image(df["path"].iloc[i])
        truth_path = df[truth_col].iloc[i] if truth_col else ""
        truth = read_mask(truth_path, (gray.shape[1], gray.shape[0])) if truth_path else None
        caption = Path(df["path"].iloc[i]).name + (f"\nDice {dice[i]:.3f}" if i in dice else "")
        rows.setdefault(df["label"].iloc[i], []).append((overlay(gray, preds[i], truth), caption, "black"))
    if not rows:
        return None
    return plot_image_grid(sorted(rows.items()), out / "segmentation.png", title, context=context)

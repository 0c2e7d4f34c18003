"""The segmentation part of an evaluation: each scored image's predicted mask against its ground
truth at the mask's native resolution (the headline Dice, IoU and HD95) and, for HD95, at the
model's input resolution too (where its masks come out and the training log measures), with
bootstrap intervals of every mean, overall and per class; the lowest-Dice images drawn, a Dice
histogram, and segmentation.csv (every image's figures)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import read_mask
from covidcxr.evaluation import figures as F
from covidcxr.evaluation import visuals
from covidcxr.plots import plot_dice_histogram

TRAINING_LOG = ("the training log (covidcxr.train's 'val:' / 'test:' lines, 'HD95 ... px at the model's {model} "
                "input', and the segmentation entry of the run's metrics.json: scored_at 'model input {model}', "
                "hd95_unit 'px at {model}') scores masks at the model's input size ({model}, where its masks come "
                "out): it resizes each ground-truth mask to that size (nearest neighbour) and thresholds the "
                "predicted probabilities at 0.5 there. Compare it with the HD95 at model resolution, not with the "
                "native-resolution HD95.")


@dataclass
class Pairs:
    """Truth and prediction per scored image, at the mask's native size and at the model's."""

    truths: list = field(default_factory=list)
    preds: list = field(default_factory=list)
    at_model: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    used: list = field(default_factory=list)     # row indices (into the scored rows) with a readable mask


def size_text(shapes) -> str:
    """'256x256', or '256x256 (58), 299x299 (2)' when sizes differ (width x height, from (h, w) shapes)."""
    counts = pd.Series([f"{w}x{h}" for h, w in shapes]).value_counts()
    return str(counts.index[0]) if len(counts) == 1 else ", ".join(f"{k} ({v})" for k, v in counts.items())


def read_pairs(rows: pd.DataFrame, col: str, masks: np.ndarray, warnings: list[str]) -> Pairs:
    """Every row with a ``col`` mask; an unreadable mask is left out with a warning, never silently."""
    has = (rows[col].astype(str) != "").to_numpy() if col in rows else np.zeros(len(rows), bool)
    out, size = Pairs(), masks.shape[1]
    for i in np.flatnonzero(has):
        try:
            t = read_mask(rows[col].iloc[i])
        except Exception as exc:
            warnings.append(f"mask left out: {exc}")
            continue
        prob = np.asarray(masks[i], np.float32)
        prob = prob[..., 0] if prob.ndim == 3 else prob
        out.truths.append(t)
        out.preds.append(P.mask_from_probs(prob, *t.shape))
        out.at_model.append((P.resize_mask(t, size).astype(bool), prob >= 0.5))
        out.labels.append(rows["label"].iloc[i])
        out.used.append(int(i))
    return out


def _resolution(seg: dict, truths: list, masks: np.ndarray) -> None:
    """Say, in metrics.json, the resolution every HD95 is measured at."""
    native, model = size_text([t.shape for t in truths]), f"{masks.shape[2]}x{masks.shape[1]}"
    seg["scored_at"] = (f"each ground-truth mask's own resolution ({native}; prediction resized bilinearly from the "
                        f"model's {model} output, then thresholded at 0.5); HD95 in those pixels")
    seg["hd95_unit"] = f"px at each ground-truth mask's native resolution ({native})"
    seg["hd95_resolution"] = {"native": native, "model": model, "hd95": "native", "per_class": "native",
                              "hd95_at_model_resolution": "model"}
    seg["hd95_at_model_resolution"].update(unit=f"px at the model's {model} input",
                                           training_log=TRAINING_LOG.format(model=model))


def per_image_csv(sub: pd.DataFrame, per_image: dict, out: Path) -> Path:
    """segmentation.csv: every scored image with its Dice, IoU and both HD95s (empty: undefined)."""
    path = out / "segmentation.csv"
    pd.DataFrame({"path": sub["path"].to_numpy(), "label": sub["label"].to_numpy(), "dice": per_image["dice"],
                  "iou": per_image["iou"], "hd95_px_native": per_image["hd95"],
                  "hd95_px_model": per_image["hd95_model"]}).sort_values("dice", kind="stable").to_csv(
        path, index=False, float_format="%.17g")
    return path


def score(rows: pd.DataFrame, col: str, masks: np.ndarray, target: str, bootstrap: int, seed: int,
          n_overlays: int, out: Path, context: str, warnings: list[str], kept: dict | None = None) -> dict:
    """The ``segmentation`` entry of metrics.json (and its pictures) for the scored ``rows``; ``kept``, when
    given, gets each image's Dice (``dice``) and its index among ``rows`` (``rows``) for the subgroups."""
    pairs = read_pairs(rows, col, masks, warnings)
    if not pairs.used:
        note = f"no {target} masks in the evaluated images" + (" could be read" if col in rows else "")
        warnings.append(note)
        return {"n": 0, "target": target, "note": note}
    seg = F.segmentation_scores(pairs.truths, pairs.preds, pairs.labels, bootstrap, seed, pairs.at_model)
    per_image = seg.pop("per_image")
    if kept is not None:
        kept.update(rows=list(pairs.used), dice=list(per_image["dice"]))
    seg.update(target=target, threshold=0.5, bootstrap_replicates=bootstrap)
    _resolution(seg, pairs.truths, masks)
    sub = rows.iloc[pairs.used].reset_index(drop=True)
    shown = visuals.overlays(sub, col, masks[pairs.used], per_image, out, n_overlays, target, context)
    seg["overlays"], seg["overlay_selection"] = shown["files"], shown["selection"]
    plot_dice_histogram(per_image["dice"], pairs.labels, out / "dice_histogram.png", target, context)
    per_image_csv(sub, per_image, out)
    return seg


def console_line(seg: dict) -> str:
    """One line for the console: the means, both HD95s and their resolutions, Dice per class."""
    hd, at = seg["hd95"], seg["hd95_at_model_resolution"]
    model = "n/a" if at["hd95"] is None else f"{at['hd95']:.2f} {at['unit']}, as in the training log"
    return (f"{seg['target']} masks (n={seg['n']}): Dice {seg['dice']:.4f}, IoU {seg['iou']:.4f}, HD95 "
            + ("n/a" if hd is None else f"{hd:.2f} {seg['hd95_unit']}") + f" ({model}); "
            + ", ".join(f"{c} Dice {v['dice']:.3f}" for c, v in seg["per_class"].items()))

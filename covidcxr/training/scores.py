"""What a finished run records about its data and its best model: the figures of each split
(``split_metrics``, the log line of its masks) and the fingerprints of its training and validation
images (the training-overlap guard of ``covidcxr.evaluate`` compares new data against them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from covidcxr import artifacts as A
from covidcxr.data.cache import fingerprints
from covidcxr.metrics import classification_metrics
from covidcxr.segmetrics import segmentation_metrics
from covidcxr.training.data import Batches
from covidcxr.training.linear_head import FeatureBatches, head_model
from covidcxr.training.loop import predict_batches


def write_fingerprints(run_dir: Path, data) -> None:
    """sha256, perceptual hashes and 16 x 16 thumbnails of the training (role 0) and validation
    (role 1) images: what ``evaluate`` compares new data against (the training-overlap guard)."""
    fp = fingerprints(data.cache)
    rows = np.concatenate([data.rows("train"), data.rows("val")])
    role = np.concatenate([np.zeros(len(data.rows("train")), np.uint8), np.ones(len(data.rows("val")), np.uint8)])
    sub = fp.subset(rows)
    thumbs16 = sub.thumbs.reshape(len(rows), 16, 2, 16, 2).mean(axis=(2, 4)).round().astype(np.uint8)
    np.savez_compressed(run_dir / A.FINGERPRINTS, sha=sub.sha, phash=sub.phash, phash_mirror=sub.phash_mirror,
                        thumbs16=thumbs16, role=role, known=sub.known)


def split_metrics(net, data, split: str, task, batch_size: int, features=None) -> dict | None:
    """Classification figures and/or Dice/IoU/HD95 of ``net`` on a split, the masks scored at the
    model's input size (the cached ground truth, resized there; ``scored_at`` and ``hd95_unit`` say so);
    ``features``: the probe's cached embeddings (then only ``net``'s head runs, on them)."""
    rows = data.rows(split)
    if not len(rows):
        return None
    if features is not None:
        net, batches = head_model(net), FeatureBatches(data, features, rows, batch_size)
    else:
        batches = Batches(data, rows, batch_size, prefetch=0)
    out = predict_batches(net, batches, task)
    m = {}
    if out.probs is not None:
        m = classification_metrics(data.labels()[rows], out.probs, data.classes)
    if out.masks is not None:
        has = data.cache.has_mask[data.mask_column][rows]
        if has.any():
            truth = np.asarray(data.cache.masks[data.mask_column][rows[has]])
            seg = segmentation_metrics(truth, out.masks[has])
            seg.pop("per_image")
            size = f"{truth.shape[2]}x{truth.shape[1]}"   # the cached masks: resized to the model's input
            m["segmentation"] = {**seg, "scored_at": f"model input {size}", "hd95_unit": f"px at {size}"}
    return m


def segmentation_line(split: str, target: str, s: dict) -> str:
    """The log line of a split's masks, naming the resolution they are scored at (the model's input,
    where ``covidcxr.evaluate``'s hd95_at_model_resolution measures too)."""
    hd = "n/a" if s["hd95"] is None else f"{s['hd95']:.2f}"
    size = s["scored_at"].removeprefix("model input ")
    return (f"{split}: {target} Dice {s['dice']:.4f}, IoU {s['iou']:.4f}, HD95 {hd} px at the model's {size} input "
            f"(n={s['n']} masks)")

"""One forward pass of a model over manifest rows, through the batched ``inference.Predictor``;
every figure, probe and picture of an evaluation reuses it (or a view of it)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm import tqdm

from covidcxr.inference import Item, Predictor


@dataclass
class Pass:
    """Outputs for the rows that ran, in row order; ``skipped`` lists (path, reason) of the rest."""

    rows: np.ndarray                    # indices into the DataFrame that was passed
    probs: np.ndarray | None            # [n, K]
    masks: np.ndarray | None            # [n, h, w] at model resolution
    sizes: np.ndarray                   # [n, 2] (height, width) of each image
    fingerprints: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def items_of(df: pd.DataFrame) -> list[Item]:
    lung = df["lung_mask"].astype(str).tolist() if "lung_mask" in df else [""] * len(df)
    return [Item(p, m, key=i) for i, (p, m) in enumerate(zip(df["path"], lung))]


def forward(predictor: Predictor, df: pd.DataFrame, *, view=None, lungs_out=False, fingerprint=False,
            quiet=False, desc="evaluating") -> Pass:
    rows, probs, masks, sizes, fps, skipped = [], [], [], [], [], []
    bar = tqdm(total=len(df), desc=desc, unit="img", disable=quiet, delay=2, file=sys.stderr, mininterval=0.5)
    for batch in predictor.run(items_of(df), fingerprint=fingerprint, view=view, lungs_out=lungs_out):
        for d in batch.failed:
            skipped.append((d.item.path, d.reason))
        for d in batch.done:
            rows.append(d.item.key)
            sizes.append((d.height, d.width))
            fps.append(d.fingerprint)
        if batch.probs is not None:
            probs.append(batch.probs)
        if batch.masks is not None:
            masks.append(batch.masks)
        bar.update(len(batch.done) + len(batch.failed))
    bar.close()
    order = np.argsort(rows, kind="stable")
    pick = (lambda arrs: np.concatenate(arrs)[order] if arrs else None)  # noqa: E731
    return Pass(np.asarray(rows, int)[order], pick(probs), pick(masks),
                np.asarray(sizes, int).reshape(-1, 2)[order], [fps[i] for i in order], skipped)


def subset(p: Pass, keep: np.ndarray) -> Pass:
    """The rows of ``p`` where ``keep`` (aligned with p.rows) is True."""
    return Pass(p.rows[keep], None if p.probs is None else p.probs[keep],
                None if p.masks is None else p.masks[keep], p.sizes[keep],
                [f for f, k in zip(p.fingerprints, keep) if k], p.skipped)

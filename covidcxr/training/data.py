"""From a run's rows to batches: mask columns, the input cache,
and a backend-neutral loader that slices shuffled uint8 batches out of it.

No tf.data: batches are NumPy arrays gathered from the memory-mapped cache by a
``keras.utils.PyDataset``, with the next batches prepared by a background thread while the
accelerator runs the current one. Epoch ``e`` of a run with seed ``s`` always visits the
images in the order ``default_rng([s, e]).permutation(n)``, so a resumed run sees exactly the
batches an uninterrupted one would.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd

from covidcxr.data.cache import CacheSpec, InputCache, open_cache


@dataclass
class RunData:
    """A run's manifest rows, opened against the input cache."""

    df: pd.DataFrame
    classes: list[str]
    cache: InputCache
    mask_column: str | None = None      # the target mask carried by batches (segment, multitask)
    needs_mask: bool = False            # rows without that mask are left out (segment)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def rows(self, split: str) -> np.ndarray:
        """Cache row indices of ``split`` that decoded (and, for a segmenter, have a mask)."""
        sel = (self.df["split"].to_numpy() == split) & self.cache.ok
        if self.needs_mask and self.mask_column:
            sel &= self.cache.has_mask[self.mask_column]
        return np.flatnonzero(sel)

    def labels(self) -> np.ndarray:
        look = {c: i for i, c in enumerate(self.classes)}
        return np.array([look.get(c, -1) for c in self.df["label"]], np.int64)


def open_run_data(df: pd.DataFrame, classes: list[str], image_size: int, contrast: str, *,
                  mask_column: str | None = None, needs_mask: bool = False, crop_column: str = "",
                  cache_dir=None, workers=None, progress: bool = True) -> RunData:
    """Open (building if needed) the cache for every row of ``df`` and list the rows that failed."""
    cols = [c for c in ("path", mask_column, crop_column) if c]
    rows = [{c: (str(v) if isinstance(v, str) else "") for c, v in zip(cols, vals)}
            for vals in df[cols].itertuples(index=False, name=None)]
    spec = CacheSpec(image_size, contrast, (mask_column,) if mask_column else (), crop_column)
    cache = open_cache(rows, spec, cache_dir, workers, progress)
    skipped = [(df["path"].iloc[i], reason) for i, reason in cache.failed]
    return RunData(df, classes, cache, mask_column, needs_mask, skipped)


class Batches(keras.utils.PyDataset):
    """uint8 batches of ``rows`` (cache indices) for ``fit`` or for a plain pass.

    Training: shuffled per epoch (``set_epoch``), last partial batch dropped (fixed shapes: one
    compiled step). Evaluation (``shuffle=False``): every row once, the last batch padded with
    repeats of its last row; ``valid(i)`` says how many rows of batch i are real. ``shard``: the rows of
    every batch this process feeds (multi-host training, training/multihost.py); ``bs`` stays global."""

    def __init__(self, data: RunData, rows: np.ndarray, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 class_weight: dict[str, float] | None = None, prefetch: int = 3, shard: slice | None = None):
        super().__init__(workers=1, use_multiprocessing=False)
        self.data, self.rows, self.bs, self.shuffle, self.seed = data, np.asarray(rows), int(batch_size), shuffle, seed
        self.labels = data.labels()
        self.onehot = np.eye(len(data.classes), dtype=np.float32)
        cw = class_weight or {}
        self.cw = np.array([float(cw.get(c, 1.0)) for c in data.classes] + [0.0], np.float32)
        self.drop = shuffle and len(self.rows) >= self.bs
        self.order = self.rows
        self.epoch, self.shard = None, shard
        self._depth = prefetch
        self._pool = ThreadPoolExecutor(1) if prefetch else None
        self._futures: dict[int, object] = {}

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.bs if self.drop else math.ceil(n / self.bs)

    def set_epoch(self, epoch: int) -> None:
        """Fix the order for ``epoch`` (a pure function of seed and epoch) and start prefetching."""
        self.epoch = epoch
        self.order = (self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))]
                      if self.shuffle else self.rows)
        self._futures.clear()
        for i in range(min(self._depth, len(self))):
            self._submit(i)

    def _submit(self, i: int) -> None:
        if self._pool is not None and i < len(self) and i not in self._futures:
            self._futures[i] = self._pool.submit(self.batch, i)

    def valid(self, i: int) -> int:
        return min(self.bs, len(self.order) - i * self.bs)

    def indices(self, i: int) -> np.ndarray:
        """Cache rows of batch i (the last evaluation batch padded with repeats of its last row)."""
        idx = self.order[i * self.bs:(i + 1) * self.bs]
        if len(idx) < self.bs and not self.drop:
            idx = np.concatenate([idx, np.repeat(idx[-1:], self.bs - len(idx))])
        return idx

    def weights(self, idx: np.ndarray) -> np.ndarray:
        lab = self.labels[idx]
        return self.cw[np.where(lab >= 0, lab, len(self.cw) - 1)]

    def batch(self, i: int):
        idx = self.indices(i) if self.shard is None else self.indices(i)[self.shard]
        srt = np.argsort(idx, kind="stable")           # read the memory map in file order
        inv = np.empty_like(srt)
        inv[srt] = np.arange(len(srt))
        cache = self.data.cache
        x = {"image": cache.images[idx[srt]][inv][..., None], "class_weight": self.weights(idx)}
        col = self.data.mask_column
        if col:
            x["mask"] = cache.masks[col][idx[srt]][inv][..., None]
            x["mask_weight"] = cache.has_mask[col][idx].astype(np.float32)
        else:
            x["mask_weight"] = np.zeros(len(idx), np.float32)
        return x, self.onehot[np.clip(self.labels[idx], 0, None)]

    def __getitem__(self, i: int):
        if self.epoch is None:
            self.set_epoch(0)
        fut = self._futures.pop(i, None)
        self._submit(i + self._depth)
        return fut.result() if fut is not None else self.batch(i)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

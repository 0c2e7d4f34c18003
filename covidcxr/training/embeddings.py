"""Cached embeddings: a frozen encoder's pooled features, computed once per (image, encoder, preprocessing).

A linear probe, a label-fraction sweep or a k-NN baseline on a frozen foundation encoder
re-reads the same images through the same weights; with a 300M-900M parameter ViT that
forward pass is nearly all the cost. ``EmbeddingCache.get`` returns the stored rows and
computes only the missing ones.

Keys (what makes a row valid):

- per image, a *content identity*: ``content_key`` (sha256 of the file bytes: survives
  copies and renames) or ``stat_key`` (path + size + mtime: cheaper, but a touched file
  counts as changed); ``image_keys`` maps a list of paths with either;
- ``encoder_id``: the weights, hashed cheaply (class, every weight's name/shape/dtype, and
  the bytes of a few tensors spread over the model, always the first and the last);
  fine-tuning, another checkpoint or another architecture gives another id;
- ``prep_key``: the preprocessing (image size, normalisation, contrast, ...).

Storage: ``ROOT/<encoder_id>/<prep_key>/`` holds append-only shards ``<name>.npy``
(float32 ``[n, D]``) and, per shard, its index ``<name>.json`` (the keys of its rows). Each
file is written under a temporary name and renamed into place, the index after its shard, so
a shard is visible only once complete: concurrent runs never read half-written data (two runs
missing the same rows may both compute them; the duplicate rows are identical and harmless).
A changed image or changed weights simply has another key: old rows stay until the folder is
deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np

from covidcxr.errors import DataError
from covidcxr.models.layers import BackboneInput, gray_input
from covidcxr.models.registry import build_backbone
from covidcxr.models.tokens import call_encoder


def content_key(path: str | Path) -> str:
    """sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stat_key(path: str | Path) -> str:
    """Hash of absolute path, size and modification time (ns)."""
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def image_keys(paths: Sequence[str | Path], mode: str = "content") -> list[str]:
    """Per-image keys: ``mode`` 'content' (file bytes) or 'stat' (path, size, mtime)."""
    fn = {"content": content_key, "stat": stat_key}.get(mode)
    if fn is None:
        raise ValueError(f"key mode {mode!r}: use 'content' or 'stat'")
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"{len(missing)} image(s) do not exist, e.g. {missing[0]}.")
    return [fn(p) for p in paths]


def encoder_id(model, sample: int | str = 8) -> str:
    """Cheap identity of a model's weights: class, all weight names/shapes/dtypes, and the bytes of ``sample``
    tensors spread evenly over the weight list (first and last included); ``sample='all'`` hashes every one."""
    weights = list(model.weights)
    h = hashlib.sha256(type(model).__name__.encode())
    for w in weights:
        h.update(f"{w.name}:{tuple(w.shape)}:{w.dtype};".encode())
    n = len(weights)
    picks = range(n) if sample == "all" or n <= int(sample) else \
        sorted({round(i * (n - 1) / (int(sample) - 1)) for i in range(int(sample))})
    for i in picks:
        h.update(np.ascontiguousarray(np.asarray(weights[i])).tobytes())
    return h.hexdigest()[:20]


def prep_key(image_size: int, normalization: str, contrast: str | None = None, **extra) -> str:
    """Identity of the preprocessing: a hash of the sorted parameters (readable copy in the folder's meta.json)."""
    params = {"image_size": int(image_size), "normalization": normalization, "contrast": contrast, **extra}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npy(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, rows)


class EmbeddingCache:
    """Append-only store of embeddings under ``root``; see the module docstring. ``last_stats`` describes
    the latest ``get`` (requested, unique, hits, computed, compute_seconds, read_seconds, shards_written)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.last_stats: dict = {}

    def folder(self, enc_id: str, prep: str) -> Path:
        for part in (enc_id, prep):
            if not part or "/" in part or "\\" in part or part.startswith("."):
                raise ValueError(f"bad cache id {part!r}")
        return self.root / enc_id / prep

    def index(self, enc_id: str, prep: str) -> dict[str, tuple[str, int]]:
        """key -> (shard name, row) over every complete shard of this (encoder, preprocessing)."""
        folder, out = self.folder(enc_id, prep), {}
        if not folder.exists():
            return out
        for manifest in sorted(folder.glob("shard-*.json")):
            doc = json.loads(manifest.read_text())
            for row, key in enumerate(doc["keys"]):
                out.setdefault(key, (manifest.stem, row))
        return out

    def _write_shard(self, folder: Path, keys: list[str], rows: np.ndarray) -> str:
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        _atomic_write(folder / f"{name}.npy", lambda p: _save_npy(p, rows))
        doc = {"keys": keys, "shape": list(rows.shape), "dtype": "float32"}
        _atomic_write(folder / f"{name}.json", lambda p: p.write_text(json.dumps(doc)))
        return name

    def _compute(self, folder: Path, keys: list[str], todo: list[int], compute_fn, batch_size: int,
                 index: dict) -> int:
        shards = 0
        for start in range(0, len(todo), batch_size):
            pos = todo[start: start + batch_size]
            rows = np.asarray(compute_fn(pos), np.float32)
            if rows.ndim != 2 or rows.shape[0] != len(pos):
                raise DataError(f"compute_fn returned shape {rows.shape} for {len(pos)} images; expected [n, D].")
            name = self._write_shard(folder, [keys[p] for p in pos], rows)
            index.update({keys[p]: (name, r) for r, p in enumerate(pos)})
            shards += 1
        return shards

    def _gather(self, folder: Path, keys: list[str], index: dict) -> np.ndarray:
        loaded: dict[str, np.ndarray] = {}
        rows = []
        for k in keys:
            shard, r = index[k]
            if shard not in loaded:
                loaded[shard] = np.load(folder / f"{shard}.npy", mmap_mode="r")
            rows.append(loaded[shard][r])
        dims = {len(r) for r in rows}
        if len(dims) > 1:
            raise DataError(f"{folder}: shards of different widths {sorted(dims)}; delete the folder and recompute.")
        return np.asarray(rows, np.float32).reshape(len(keys), -1)

    def get(self, keys: Sequence[str], enc_id: str, prep: str, compute_fn: Callable[[list[int]], np.ndarray],
            batch_size: int = 64, meta: dict | None = None) -> np.ndarray:
        """float32 ``[N, D]`` in the order of ``keys``. ``compute_fn(positions)`` gets positions into ``keys``
        (first occurrence of each missing key) and returns their ``[len(positions), D]`` embeddings; it is
        called once per ``batch_size`` missing images and every batch is stored as it comes."""
        keys = [str(k) for k in keys]
        folder = self.folder(enc_id, prep)
        folder.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (folder / "meta.json").exists():
            _atomic_write(folder / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
        index = self.index(enc_id, prep)
        first = {}
        for pos, k in enumerate(keys):
            first.setdefault(k, pos)
        todo = [pos for k, pos in first.items() if k not in index]
        t0 = time.perf_counter()
        shards = self._compute(folder, keys, todo, compute_fn, batch_size, index)
        t1 = time.perf_counter()
        out = self._gather(folder, keys, index) if keys else np.zeros((0, 0), np.float32)
        self.last_stats = {"requested": len(keys), "unique": len(first), "hits": len(first) - len(todo),
                           "computed": len(todo), "compute_seconds": t1 - t0,
                           "read_seconds": time.perf_counter() - t1, "shards_written": shards}
        return out


def pooled_feature_model(spec, image_size: int, weights):
    """uint8-range gray ``[B, S, S, 1]`` -> the pooled features ``build_classifier``'s head sees (``gap``):
    for a frozen-encoder probe on cached embeddings. Returns (model, backbone)."""
    backbone = build_backbone(spec, image_size, weights)
    backbone.trainable = False
    inputs = gray_input(image_size)
    feats = call_encoder(backbone, BackboneInput(spec.normalization, name="preprocess")(inputs), pretrained=True)
    pool = keras.layers.GlobalAveragePooling1D if len(feats.shape) == 3 else keras.layers.GlobalAveragePooling2D
    return keras.Model(inputs, pool(name="gap")(feats), name=f"{spec.name}_features"), backbone

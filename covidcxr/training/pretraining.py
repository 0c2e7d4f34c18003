"""Self-supervised pretraining as a library: the images of a folder or manifest, the input cache, the
epochs (through ``covidcxr.training.loop.fit_epoch``), precise BatchNormalization statistics, and the
encoder weights with their ``.json`` record (``python -m covidcxr.pretrain`` is the command)."""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from covidcxr.data.imageio import is_image_file
from covidcxr.data.layouts import INFECTION_MASK_DIRS, LUNG_MASK_DIRS
from covidcxr.errors import ConfigError, CovidCXRError, DataError, RunExistsError
from covidcxr.models.registry import get_spec
from covidcxr.training import devices as D
from covidcxr.training.data import Batches, open_run_data
from covidcxr.training.loop import build_state, fit_epoch
from covidcxr.training.simclr import build_simclr, load_size, nt_xent, plain_views, recalibrate_batchnorm


def _manifest_paths(data: Path, split: str) -> list[str]:
    try:
        df = pd.read_csv(data, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"--data {data}: not a readable CSV manifest ({exc}).") from exc
    if "path" not in df.columns:
        raise DataError(f"--data {data}: a manifest needs a 'path' column (python -m covidcxr.data index).")
    if "split" in df.columns and split != "all":
        wanted = [s.strip() for s in split.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(df["split"]))
        if unknown:
            raise DataError(f"--split {split}: {data} has no rows in split(s) {unknown}; it has "
                            f"{sorted(set(df['split']))} (or pass --split all).")
        df = df[df["split"].isin(wanted)]
    base = data.resolve().parent  # relative paths are relative to the manifest, as covidcxr.data writes them
    return [p if os.path.isabs(p) else str(base / p) for p in df["path"] if p]


def image_paths(data: str | Path, split: str = "train") -> list[str]:
    """Image files of ``data``. From a manifest with a ``split`` column only the rows of ``split``
    (comma-separated names, or ``all``) are used, so that validation and test images stay unseen.
    A folder is searched recursively; the mask folders of the known layouts are left out (masks
    are images too)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder.")
    if data.is_file() and data.suffix.lower() == ".csv":
        paths = _manifest_paths(data, split)
        if not paths:
            raise DataError(f"--data {data}: no rows to pretrain on.")
        return paths
    if data.is_file():
        return [str(data)]
    masks = {d.lower() for d in LUNG_MASK_DIRS + INFECTION_MASK_DIRS}
    files = [f for f in sorted(data.rglob("*")) if f.is_file() and is_image_file(f)
             and not any(p.lower() in masks for p in f.relative_to(data).parts[:-1])]
    if not files:
        raise DataError(f"--data {data}: no image files found.")
    return [str(f) for f in files]


def _open_images(paths: list[str], image_size: int, cache_dir, workers):
    """(RunData of the decoded images at the load size, usable cache rows); unreadable files are
    reported and left out."""
    df = pd.DataFrame({"path": paths, "label": "x", "split": "train"})
    data = open_run_data(df, ["x"], load_size(image_size), "none", cache_dir=cache_dir, workers=workers,
                         progress=sys.stderr.isatty())
    c = data.cache
    print(f"input cache: {c.path} ({'built in %.1f s' % c.built_seconds if c.built_seconds else 'reused'}, "
          f"{int(c.ok.sum())} of {len(c.ok)} images)")
    if data.skipped:
        print(f"left out {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0][1]}", file=sys.stderr)
    rows = data.rows("train")
    if len(rows) < 2:
        raise DataError(f"contrastive learning needs at least 2 images, found {len(rows)} readable ones.")
    return data, rows


def _fit(model, batches, epochs: int) -> list[float]:
    """The epochs, each run by the training loop's ``fit_epoch`` (batch order fixed by the epoch: the
    same seed gives the same batches and views on every backend)."""
    losses = []
    for epoch in range(epochs):
        logs, seconds = fit_epoch(model, batches, epoch, f"epoch {epoch + 1}/{epochs} [simclr]  ")
        losses.append(logs["loss"])
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({seconds:.1f} s)", flush=True)
        if not np.isfinite(losses[-1]):
            raise CovidCXRError(f"pretraining diverged (loss {losses}); lower --lr.")
    return losses


def _recalibrate(model, data, rows, batch_size: int) -> str:
    """Precise BN statistics of the encoder on plain views of the training images."""
    plain = Batches(data, rows, batch_size, prefetch=0)
    feed = (model.backbone_input(plain_views(plain[i][0]["image"][:plain.valid(i)], model.image_size))
            for i in range(len(plain)))
    n_bn = recalibrate_batchnorm(model.encoder, feed, max_batches=200)
    return f"recomputed on {min(len(rows), n_bn * batch_size)} unaugmented images" if n_bn else "none in this encoder"


def pretrain(arch: str, data: str, out: str | Path, image_size: int = 224, epochs: int = 10, batch_size: int = 64,
             lr: float = 1e-3, temperature: float = 0.1, seed: int = 0, overwrite: bool = False,
             split: str = "train", cache_dir=None, workers=None) -> Path:
    """Pretrain ``arch`` with SimCLR on the images of ``data``; write ``out`` and ``out.json``."""
    get_spec(arch)
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConfigError(f"--out {out}: the encoder weights file must end in .weights.h5.")
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or another --out.")
    images, rows = _open_images(image_paths(data, split), image_size, cache_dir, workers)
    batch_size = min(batch_size, len(rows))
    device = D.detect()
    policy = D.precision_policy(device, None)
    keras.mixed_precision.set_global_policy(policy)
    D.make_deterministic(seed, device)
    model, encoder = build_simclr(arch, image_size, seed=seed)
    batches = Batches(images, rows, batch_size, shuffle=True, seed=seed)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=1e-4), loss=nt_xent(temperature),
                  jit_compile=device.backend == "jax" or D.use_jit(device, None))
    build_state(model, batches)
    print(f"SimCLR pretraining of {arch} on {len(rows)} unlabelled images at {image_size} px, batch {batch_size} "
          f"({2 * batch_size} views), {epochs} epochs, temperature {temperature}; {device.describe()}, {policy}")
    t0 = time.perf_counter()
    try:
        losses = _fit(model, batches, epochs)
    finally:
        batches.close()
    bn_note = _recalibrate(model, images, rows, batch_size)
    print(f"BatchNormalization statistics: {bn_note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".partial.weights.h5"))
    encoder.save_weights(tmp)
    tmp.replace(out)
    meta = {"arch": arch, "method": "simclr", "image_size": image_size, "epochs": epochs, "batch_size": batch_size,
            "temperature": temperature, "lr": lr, "images": len(rows), "data": str(data), "split": split,
            "loss": losses, "seconds": round(time.perf_counter() - t0, 1), "batchnorm": bn_note}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (chance level {math.log(2 * batch_size - 1):.4f}); "
          f"encoder weights: {out}\nfine-tune: "
          + shlex.join(["python", "-m", "covidcxr.train", "--arch", arch, "--weights", str(out), "--data", "DIR"]))
    return out

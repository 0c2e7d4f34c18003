"""The inputs of a zero-shot run (``python -m covidcxr.zeroshot``).

- ``load_rows``: the images to score, from a dataset folder (indexed on the fly) or a manifest,
  with ``--split`` chosen as ``evaluate`` chooses it; files indexing could not read are kept
  as problems so that every unreadable image is listed.
- ``check_family``: a preset must hold the model family the command was asked for (CLIP or
  SigLIP), refused before any weights load, naming both.
- ``decoded_batches``: images decoded on the host by a thread pool (covidcxr.data.preprocess,
  as training and prediction decode them), at most ~3 batches ahead of the model, so memory
  does not grow with the number of files; unreadable ones are collected with their reason.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from covidcxr.artifacts import check_free
from covidcxr.data import preprocess as P
from covidcxr.data.imageio import inspect_file
from covidcxr.data.pool import decode_ahead, default_workers
from covidcxr.errors import ConfigError, DataError
from covidcxr.evaluation.data import EvalData, load_data
from covidcxr.models.presets import describe_preset


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

"""The rows of a run: its manifest (or the synthetic demo set), the checks on its splits and classes,
a stratified label fraction, and class weights. ``covidcxr.training.data`` turns the rows into batches."""
from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.artifacts import LungCrop
from covidcxr.data.manifest import build_manifest, read_manifest
from covidcxr.data.splits import parse_fractions
from covidcxr.data.synth import write_synthetic_dataset
from covidcxr.errors import DataError
from covidcxr.lungcrop import given_masks


def class_weights(labels, class_names: list[str]) -> dict[str, float]:
    """Balanced weights n / (k * n_c) from the training labels (missing classes -> 0)."""
    counts = pd.Series(list(labels)).value_counts()
    n, k = len(labels), len(class_names)
    return {c: (n / (k * counts[c]) if counts.get(c, 0) else 0.0) for c in class_names}


def label_subset(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep a stratified, seeded ``fraction`` of the training rows (at least one per class);
    the others get split 'unused' so the manifest still lists them."""
    if fraction >= 1.0:
        return df
    rng = np.random.default_rng(seed)
    df = df.copy()
    for _, idx in df[df["split"] == "train"].groupby("label").groups.items():
        idx = np.array(sorted(idx))
        keep = max(1, int(round(fraction * len(idx))))
        df.loc[rng.permutation(idx)[keep:], "split"] = "unused"
    return df


DEMO = dict(per_class=100, synth_size=128, image_size=128, epochs=4, fine_tune_epochs=4, batch_size=32)


def demo_data(cache_root: Path) -> Path:
    """Build (once) and reuse the synthetic demo set."""
    d = cache_root / f"demo-{DEMO['per_class']}x{DEMO['synth_size']}px-seed0"
    if not (d / ".complete").exists():
        if d.exists():
            shutil.rmtree(d)
        write_synthetic_dataset(d, DEMO["per_class"], DEMO["synth_size"], seed=0)
        (d / ".complete").write_text("ok\n")
    return d


def load_manifest(data: str | None, split: str, seed: int, demo_root: Path, log=print):
    """(manifest DataFrame, class names, [(path, reason)] left out by indexing) for a run."""
    src = Path(data) if data else demo_data(demo_root)
    problems: list[tuple[str, str]] = []
    if src.is_file():
        df = read_manifest(src)
        log(f"manifest: {src} ({len(df)} images)")
    else:
        df, report = build_manifest(src, parse_fractions(split), seed, progress=sys.stderr.isatty())
        log(f"indexed {report.root}: {report.layout} layout, {len(df)} images; split: {report.split_source}")
        problems = [(p.path, p.reason) for p in report.problems]
        groups = report.dedup.duplicate_groups
        log(f"duplicate groups: {len(groups)} ({sum(map(len, groups.values()))} images), kept within one split")
        audit = shlex.join(['python', '-m', 'covidcxr.data', 'audit', str(src)])
        if report.crossing_groups:
            log(f"WARNING: {len(report.crossing_groups)} duplicate groups cross the dataset's own split (see {audit})")
        if report.crossing_patients:
            log(f"WARNING: {len(report.crossing_patients)} patients have films in more than one of the dataset's own "
                f"splits (see {audit})")
    classes = sorted(df["label"].unique())
    counts = df[df["split"] == "train"]["label"].value_counts()
    empty = [c for c in classes if counts.get(c, 0) == 0]
    if empty:
        raise DataError(f"class(es) {empty} have no training images; add images or remove the class.")
    for s in ("train", "val"):
        if not (df["split"] == s).any():
            raise DataError(f"the '{s}' split is empty; use --split with a non-zero {s} fraction or a manifest "
                            f"that has {s} rows.")
    return df.reset_index(drop=True), classes, problems


def check_split_sizes(data) -> None:
    """Refuse a run whose training or validation split is empty after bad files are left out."""
    for split in ("train", "val"):
        if not len(data.rows(split)):
            what = f" with a {data.mask_column.replace('_', ' ')}" if data.needs_mask and data.mask_column else ""
            raise DataError(f"no usable '{split}' image{what} (after leaving out unreadable files); use --split with "
                            f"a non-zero {split} fraction or a manifest that has such {split} rows.")


def prepare_rows(cfg, task, log) -> tuple[pd.DataFrame, list[str], list]:
    df, classes, problems = load_manifest(cfg.data, cfg.split, cfg.seed, Path("experiments") / "cache", log)
    if cfg.label_fraction < 1.0:
        before = int((df["split"] == "train").sum())
        df = label_subset(df, cfg.label_fraction, cfg.seed)
        kept = df[df["split"] == "train"]["label"].value_counts().sort_index()
        log(f"label fraction {cfg.label_fraction:g}: {int(kept.sum())} of {before} training images "
            f"({', '.join(f'{c} {n}' for c, n in kept.items())}); the rest are marked 'unused'")
    if cfg.crop is LungCrop.GIVEN:
        df = given_masks(df)
    if task.segments:
        col = task.mask_column(cfg.target)
        has = df[col].astype(str) != "" if col in df else pd.Series(False, index=df.index)
        if not has[df["split"] == "train"].any():
            raise DataError(f"--task {cfg.task} --target {cfg.target}: the training split has no {cfg.target} masks "
                            f"({col} is empty for every image). Use data with {cfg.target} masks (COVID-QU-Ex has lung "
                            f"and infection masks; the Kaggle set has lung masks for some classes).")
        log(f"{cfg.target} masks: {int(has.sum())} of {len(has)} images"
            + ("" if task.only_segments else " (images without one train the classifier only: mask loss weight 0)"))
    return df, classes, problems

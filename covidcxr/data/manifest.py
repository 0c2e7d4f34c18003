"""The manifest: one CSV row per image, the single source of truth of an experiment.

Columns (``COLUMNS``): ``path, label, lung_mask, infection_mask, split, sha256, group, width,
height, mode, phash, dup_group`` and the metadata columns of ``covidcxr/data/metadata.py``
(``patient_id, study_id, view, sex, age, site, manufacturer``: IDs empty where unknown, the others
"unknown"; filled from ``--metadata`` or DICOM tags). Mask columns are empty where there is no mask.
``dup_group`` ties exact and near-duplicate images together; ``group`` is the *split group*: the
union of duplicate groups and patients (all films of one patient and every near-duplicate of them),
which never straddles two splits when the split is ours. Paths are absolute when written by
``index``; relative paths are resolved against the manifest's folder. ``read_manifest`` gives old
manifests the newer columns (``dup_group`` from ``group``, metadata unknown).
"""
from __future__ import annotations

import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from covidcxr.data import metadata as meta
from covidcxr.data.dedup import DedupResult, group_duplicates
from covidcxr.data.dicomtags import dicom_metadata
from covidcxr.data.imageio import FileInfo, check_mask, inspect_file
from covidcxr.data.layouts import Problem, Scan, scan_dataset
from covidcxr.data.metatable import join_table, parse_column_spec, read_table, resolve_columns
from covidcxr.data.pool import default_workers
from covidcxr.data.splits import SPLITS, split_groups, stratified_group_split
from covidcxr.errors import ConfigError, DataError, RunExistsError

COLUMNS = ["path", "label", "lung_mask", "infection_mask", "split", "sha256", "group",
           "width", "height", "mode", "phash", "dup_group", *meta.COLUMNS]


@dataclass
class IndexReport:
    root: str
    layout: str
    problems: list[Problem] = field(default_factory=list)
    dedup: DedupResult | None = None
    crossing_groups: list[list[int]] = field(default_factory=list)     # duplicate groups crossing splits
    split_source: str = ""
    metadata: meta.MetadataReport = field(default_factory=meta.MetadataReport)
    crossing_patients: list[dict] = field(default_factory=list)         # see metadata.crossing_patients
    split_groups: int = 0                                                # distinct ``group`` values


def inspect_files(paths: list[str], workers: int | None = None, progress: bool = True,
                  desc: str = "checking images") -> list[FileInfo]:
    """Decode, hash and thumbnail every file, in parallel threads (Pillow and
    hashlib release the GIL), with a progress bar."""
    workers = workers or default_workers()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        it = ex.map(inspect_file, paths, chunksize=16)
        return list(tqdm(it, total=len(paths), desc=desc, unit="img", disable=not progress,
                         mininterval=0.5))


def _check_masks(records, workers, progress, problems) -> None:
    masks = [(r, kind) for r in records for kind in ("lung_mask", "infection_mask") if getattr(r, kind)]
    if not masks:
        return
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as ex:
        reasons = list(tqdm(ex.map(lambda rk: check_mask(getattr(*rk)), masks), total=len(masks),
                            desc="checking masks", unit="mask", disable=not progress, mininterval=0.5))
    for (r, kind), reason in zip(masks, reasons):
        if reason:
            problems.append(Problem(getattr(r, kind), f"unreadable {kind.replace('_', ' ')} ({reason}); "
                                                      f"image kept without this mask"))
            setattr(r, kind, "")


def build_manifest(data: str | Path, fractions: tuple[float, ...], seed: int = 42,
                   workers: int | None = None, progress: bool = True,
                   dedup_kwargs: dict | None = None, min_classes: int = 2,
                   metadata: str | Path | None = None,
                   metadata_columns: str | dict | None = None) -> tuple[pd.DataFrame, IndexReport]:
    """Scan ``data``, check every file, join metadata, group duplicates and patients, split. Bad
    files are reported in the IndexReport and left out of the manifest. ``min_classes``: see
    ``scan_dataset``. ``metadata``: a per-image CSV table joined by file name or path (see
    ``metatable.py``; ``metadata_columns`` names its columns); without one, DICOM files' own tags."""
    scan: Scan = scan_dataset(data, min_classes)
    report = IndexReport(scan.root, scan.layout, list(scan.problems))
    table = _read_metadata(metadata, metadata_columns)  # a bad table fails before the slow file check
    infos = inspect_files([r.path for r in scan.records], workers, progress)
    good = []
    for rec, info in zip(scan.records, infos):
        if info.ok:
            good.append((rec, info))
        else:
            report.problems.append(Problem(rec.path, f"{info.reason}; left out"))
    if not good:
        raise DataError(f"{data}: none of the {len(infos)} image files could be read.")
    records = [r for r, _ in good]
    _check_masks(records, workers, progress, report.problems)
    df = pd.DataFrame({
        "path": [r.path for r in records],
        "label": [r.label for r in records],
        "lung_mask": [r.lung_mask for r in records],
        "infection_mask": [r.infection_mask for r in records],
        "sha256": [i.sha256 for _, i in good],
        "width": [i.width for _, i in good],
        "height": [i.height for _, i in good],
        "mode": [i.mode for _, i in good],
        "phash": [f"{i.phash:016x}" for _, i in good],
    })
    values, report.metadata = _metadata_values(table, [r.path for r in scan.records], [i.ok for i in infos],
                                               [str(Path(os.path.abspath(data))), scan.root], workers)
    for col in meta.COLUMNS:
        df[col] = values[col]
    thumbs = np.stack([i.thumb for _, i in good])
    result = group_duplicates(df["sha256"].tolist(), np.array([i.phash for _, i in good], np.uint64),
                              np.array([i.phash_mirror for _, i in good], np.uint64), thumbs,
                              **(dedup_kwargs or {}))
    report.dedup = result
    df["dup_group"] = result.group
    df["group"] = split_groups(result.group, df["patient_id"].tolist())
    report.split_groups = int(df["group"].nunique())
    df["split"], report.split_source = _split(df, [r.official_split for r in records], fractions, seed)
    report.crossing_groups = crossing_groups(df, "dup_group")
    report.crossing_patients = meta.crossing_patients(df)
    return df[COLUMNS], report


def _read_metadata(path, columns) -> tuple | None:
    """(path, table, {manifest column: table column}) of ``--metadata``, read and its columns checked;
    None without one."""
    if path is None:
        if columns:
            raise ConfigError("--metadata-columns is given without --metadata META.csv; add the table.")
        return None
    df = read_table(path)
    given = columns if isinstance(columns, dict) else parse_column_spec(columns)
    return path, df, resolve_columns(list(df.columns), given, path)


def _metadata_values(table, paths: list[str], ok: list[bool], roots: list[str], workers):
    """Normalised metadata columns of the readable files among ``paths`` and their report: from the
    table (matched over every scanned file, see ``join_table``), else from DICOM tags."""
    if table is None:
        return dicom_metadata([p for p, k in zip(paths, ok) if k], workers)
    path, df, spec = table
    return join_table(path, spec, paths, roots, df, keep=ok)


def _split(df: pd.DataFrame, official: list[str], fractions, seed) -> tuple[list[str], str]:
    """(split per image, where it came from): the dataset's own when it has two or more of its
    splits (groups crossing it are reported, not moved), else a stratified split of ``group``."""
    present = {s for s in official if s}
    if present and len(present) >= 2:
        return official, f"dataset's own split ({', '.join(s for s in SPLITS if s in present)})"
    split = stratified_group_split(df["label"].tolist(), df["group"].tolist(), fractions, seed)
    return split, (f"stratified group split {','.join(str(f) for f in fractions if f)} seed {seed}"
                   + (f" (dataset holds only its '{present.pop()}' split)" if present else ""))


def crossing_groups(df: pd.DataFrame, column: str = "group") -> list[list[int]]:
    """Groups (of ``column``) of row indices whose members sit in more than one split."""
    out = []
    for _, sub in df.groupby(column):
        if sub["split"].nunique() > 1:
            out.append(sub.index.tolist())
    return out


def write_manifest(df: pd.DataFrame, path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise RunExistsError(f"{path} already exists; pass --overwrite to replace it or choose another --out.")
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV; resolve relative paths against its folder; check columns. Every column
    of ``COLUMNS`` but the image facts is there after reading (metadata unknown where absent)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found. Create one with "
                        f"{shlex.join(['python', '-m', 'covidcxr.data', 'index', 'DATA', '--out', str(path)])}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from exc
    missing = [c for c in ("path", "label", "split") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {', '.join(missing)}; "
                        f"re-create it with 'python -m covidcxr.data index'.")
    base = path.resolve().parent
    for col in ("path", "lung_mask", "infection_mask"):
        if col not in df.columns:
            df[col] = ""
        df[col] = [str(base / p) if p and not os.path.isabs(p) else p for p in df[col]]
    for col, default in (("mode", ""), ("sha256", ""), ("group", None)):
        if col not in df.columns:
            df[col] = list(range(len(df))) if default is None else default
    if "group" in df.columns:
        df["group"] = pd.to_numeric(df["group"], errors="coerce").fillna(-1).astype(np.int64)
    # before issue 22 'group' was the duplicate group (no patient grouping): the same thing for those files
    df["dup_group"] = (pd.to_numeric(df["dup_group"], errors="coerce").fillna(-1).astype(np.int64)
                       if "dup_group" in df.columns else df["group"])
    meta.ensure_columns(df)
    bad = sorted(set(df["split"]) - set(SPLITS) - {"unused"})  # 'unused': left out by --label-fraction
    if bad:
        raise DataError(f"{path}: unknown split name(s) {bad}; use train, val or test.")
    return df


def class_split_table(df: pd.DataFrame) -> str:
    """A plain-text class-by-split count table (with mask counts)."""
    t = pd.crosstab(df["label"], df["split"]).reindex(columns=[s for s in SPLITS if s in set(df["split"])],
                                                      fill_value=0)
    t["total"] = t.sum(axis=1)
    t["lung masks"] = df.groupby("label")["lung_mask"].apply(lambda s: int((s != "").sum()))
    t["infection masks"] = df.groupby("label")["infection_mask"].apply(lambda s: int((s != "").sum()))
    t.loc["total"] = t.sum(axis=0)
    return t.to_string()

"""Dataset audit: balance, sizes and modes, masks, duplicates, metadata coverage and split leakage
(duplicate groups and patients crossing splits)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.dedup import group_duplicates
from covidcxr.data.manifest import build_manifest, crossing_groups, inspect_files, read_manifest
from covidcxr.data.metadata import coverage, crossing_patients, format_coverage, format_crossing_patient
from covidcxr.errors import DataError


def audit(source: str | Path, fractions=(0.7, 0.15, 0.15), seed: int = 42, workers=None,
          progress: bool = True) -> dict:
    """Audit a dataset folder or a manifest. Duplicates are always recomputed from the pixels."""
    source = Path(source)
    problems: list[str] = []
    if source.is_file():
        df = read_manifest(source)
        infos = inspect_files(df["path"].tolist(), workers, progress)
        ok = np.array([i.ok for i in infos])
        problems += [f"{i.path}: {i.reason}" for i in infos if not i.ok]
        if not ok.any():
            raise DataError(f"{source}: none of the {len(infos)} images in the manifest could be read "
                            f"(first: {problems[0] if problems else '?'}). Were the files moved? Re-run index.")
        df = df[ok].reset_index(drop=True)
        infos = [i for i in infos if i.ok]
        df["width"] = [i.width for i in infos]
        df["height"] = [i.height for i in infos]
        df["mode"] = [i.mode for i in infos]
        df["sha256"] = [i.sha256 for i in infos]
        res = group_duplicates(df["sha256"].tolist(), np.array([i.phash for i in infos], np.uint64),
                               np.array([i.phash_mirror for i in infos], np.uint64),
                               np.stack([i.thumb for i in infos]) if infos else np.zeros((0, 32, 32)))
        df["dup_group"] = res.group
        layout, split_source = "manifest", f"manifest {source}"
    else:
        df, report = build_manifest(source, fractions, seed, workers, progress)
        problems += [str(p) for p in report.problems]
        res, layout, split_source = report.dedup, report.layout, report.split_source
    groups = res.duplicate_groups
    crossing = crossing_groups(df, "dup_group")
    sizes = (df["width"].astype(str) + "x" + df["height"].astype(str)).value_counts()
    return {
        "source": str(source),
        "layout": layout,
        "split_source": split_source,
        "images": int(len(df)),
        "classes": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()},
        "class_by_split": {c: {k: int(v) for k, v in g["split"].value_counts().items()}
                           for c, g in df.groupby("label")},
        "sizes": {k: int(v) for k, v in sizes.head(10).items()},
        "distinct_sizes": int(len(sizes)),
        "modes": {k: int(v) for k, v in df["mode"].value_counts().items()},
        "masks": {c: {"lung": int((g["lung_mask"] != "").sum()),
                      "infection": int((g["infection_mask"] != "").sum()), "images": int(len(g))}
                  for c, g in df.groupby("label")},
        "exact_duplicate_pairs": res.exact_pairs,
        "near_duplicate_pairs": res.near_pairs,
        "mirrored_pairs": res.mirrored_pairs,
        "duplicate_groups": len(groups),
        "images_in_duplicate_groups": int(sum(len(m) for m in groups.values())),
        "groups": [[df["path"][i] for i in m] for m in groups.values()],
        "crossing_groups": [[f"{df['split'][i]}: {df['path'][i]}" for i in m] for m in crossing],
        "label_conflicts": [[f"{df['label'][i]}: {df['path'][i]}" for i in m] for m in groups.values()
                            if df["label"][m].nunique() > 1],
        "metadata": coverage(df),
        "crossing_patients": crossing_patients(df),
        "problems": problems,
    }


def format_audit(a: dict, max_list: int = 10) -> str:
    lines = [f"Audit of {a['source']} ({a['layout']} layout, {a['images']} readable images)",
             f"Split: {a['split_source']}", ""]
    t = pd.DataFrame(a["class_by_split"]).T.fillna(0).astype(int)
    t["total"] = t.sum(axis=1)
    for c in t.index:
        t.loc[c, "lung masks"] = a["masks"][c]["lung"]
        t.loc[c, "infection masks"] = a["masks"][c]["infection"]
    lines += ["Class balance (images per split, masks):", t.astype(int).to_string(), ""]
    counts = np.array(list(a["classes"].values()))
    if len(counts):
        lines.append(f"Imbalance: largest/smallest class = {counts.max() / max(counts.min(), 1):.2f}")
    lines.append(f"Image sizes ({a['distinct_sizes']} distinct): "
                 + ", ".join(f"{k} x{v}" for k, v in a["sizes"].items()))
    lines.append("Modes: " + ", ".join(f"{k} x{v}" for k, v in a["modes"].items()))
    lines += ["", f"Duplicates: {a['duplicate_groups']} groups holding {a['images_in_duplicate_groups']} images "
                  f"({a['exact_duplicate_pairs']} exact pairs, {a['near_duplicate_pairs']} near pairs, "
                  f"{a['mirrored_pairs']} mirrored)"]
    for g in a["groups"][:max_list]:
        lines.append("  - " + " | ".join(g))
    if len(a["groups"]) > max_list:
        lines.append(f"  ... {len(a['groups']) - max_list} more groups")
    if a["label_conflicts"]:
        lines.append(f"Label conflicts (same image, different classes): {len(a['label_conflicts'])}")
        for g in a["label_conflicts"][:max_list]:
            lines.append("  - " + " | ".join(g))
    lines.append(f"Groups crossing splits (leakage): {len(a['crossing_groups'])}")
    for g in a["crossing_groups"][:max_list]:
        lines.append("  - " + " | ".join(g))
    lines += ["", "Metadata:"] + ["  " + x for x in format_coverage(a["metadata"])]
    lines.append(f"Patients crossing splits (leakage): {len(a['crossing_patients'])}")
    for p in a["crossing_patients"][:max_list]:
        lines.append("  - " + format_crossing_patient(p))
    if len(a["crossing_patients"]) > max_list:
        lines.append(f"  ... {len(a['crossing_patients']) - max_list} more patients")
    if a["problems"]:
        lines += ["", f"Problem files ({len(a['problems'])}):"] + [f"  - {p}" for p in a["problems"][:50]]
    return "\n".join(lines)

"""What `data index --metadata` adds to index time (issue 22: under 10% at 20,000 rows).

    python benchmarks/metadata_index.py [--rows 20000] [--images 1000] [--size 299] [--workdir DIR]

1. Metadata work at full scale, without images: a 20,000-row table (NIH-style column names, mixed
   spellings of sex/view/age, 5% bad ages, 4,000 patients) for 20,000 image paths is written as CSV,
   then read, its columns detected, joined by file name, normalised, patient/duplicate groups unioned,
   crossing patients and coverage computed: every step `--metadata` adds to `index`.
2. Index time per image on real files: `--images` generated 299x299 PNGs (Kaggle layout) indexed with
   `build_manifest`, without and with a matching metadata table (both timed; the difference is noisy at
   this size), extrapolated per image to `--rows` images.
Prints seconds and the overhead as a share of the extrapolated index time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.manifest import build_manifest
from covidcxr.data.metadata import coverage, crossing_patients
from covidcxr.data.metatable import join_table, read_table
from covidcxr.data.splits import split_groups, stratified_group_split

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
SEX = ("F", "M", "female", "Male", "", "O")
VIEW = ("PA", "AP", "AP Supine", "LL", "LATERAL", "")
AGE = ("045Y", "61", "7 months", "abc", "-3", "")


def _table(names: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(names)
    pick = lambda vals, p=None: np.asarray(vals)[rng.choice(len(vals), n, p=p)]  # noqa: E731
    return pd.DataFrame({"Image Index": names, "Patient ID": [f"P{i}" for i in rng.integers(0, n // 5, n)],
                         "View Position": pick(VIEW), "Patient Gender": pick(SEX),
                         "Patient Age": pick(AGE, [0.4, 0.3, 0.1, 0.03, 0.02, 0.15]),
                         "Hospital": pick(("A", "B", "C"))})


def metadata_work(rows: int, workdir: Path) -> dict:
    """Seconds of each step `--metadata` adds, on ``rows`` paths and table rows (no images)."""
    root = str(workdir / "fake")
    paths = [f"{root}/{CLASSES[i % 4]}/images/{CLASSES[i % 4]}-{i}.png" for i in range(rows)]
    csv = workdir / "meta20k.csv"
    _table([p.rsplit("/", 1)[1] for p in paths]).to_csv(csv, index=False)
    t = {}
    t0 = time.perf_counter()
    table = read_table(csv)
    t["read CSV"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    values, report = join_table(csv, None, paths, [root], table)
    t["detect + join + normalise"] = time.perf_counter() - t0
    labels = [CLASSES[i % 4] for i in range(rows)]
    t0 = time.perf_counter()
    groups = split_groups(np.arange(rows), values["patient_id"])
    t["union of duplicate and patient groups"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    split_p = stratified_group_split(labels, groups.tolist(), (0.7, 0.15, 0.15), 42)
    t_split_p = time.perf_counter() - t0
    t0 = time.perf_counter()
    stratified_group_split(labels, list(range(rows)), (0.7, 0.15, 0.15), 42)
    split_delta = t_split_p - (time.perf_counter() - t0)   # fewer, larger groups: usually faster, not counted
    print(f"split of patient groups against duplicate-only groups: {split_delta:+.3f} s (not added below)")
    df = pd.DataFrame({**values, "split": split_p})
    t0 = time.perf_counter()
    crossing = crossing_patients(df)
    cov = coverage(df)
    t["crossing patients + coverage"] = time.perf_counter() - t0
    assert report.matched == rows and not crossing, "every row matches and no patient crosses"
    print(f"table: {rows} rows, {cov['patients']} patients; {len(report.invalid.get('age', []))} bad ages")
    return t


def _images(n: int, size: int, root: Path) -> list[str]:
    from PIL import Image

    names = []
    for i in range(n):
        cls = CLASSES[i % 4]
        rng = np.random.default_rng(i)
        low = Image.fromarray(rng.uniform(0, 255, (8, 8)).astype(np.float32)).resize((size, size), Image.BICUBIC)
        arr = np.clip(np.asarray(low) + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8)
        (root / cls / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode="L").save(root / cls / "images" / f"{cls}-{i}.png")
        names.append(f"{cls}-{i}.png")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="metaindex-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = metadata_work(args.rows, work)
    for k, v in steps.items():
        print(f"  {k}: {v:.3f} s")
    total = sum(steps.values())
    print(f"metadata work at {args.rows} rows: {total:.2f} s")
    data = work / "images"
    names = _images(args.images, args.size, data) if not data.exists() else \
        [p.name for p in sorted(data.rglob("*.png"))]
    meta = work / "meta_images.csv"
    _table(names).to_csv(meta, index=False)
    times: dict[bool, list[float]] = {False: [], True: []}
    for with_table in (False, True, False, True):    # alternated, best of two each: the host is shared
        t0 = time.perf_counter()
        build_manifest(data, (0.7, 0.15, 0.15), progress=False, metadata=meta if with_table else None)
        times[with_table].append(time.perf_counter() - t0)
    plain, with_meta = min(times[False]), min(times[True])
    per_image = plain / len(names)
    print(f"index of {len(names)} images ({args.size} px): {plain:.2f} s plain, {with_meta:.2f} s with --metadata "
          f"({(with_meta - plain) / plain:+.1%}, noisy; best of 2 each); {per_image * 1000:.2f} ms per image")
    est = per_image * args.rows
    print(f"index of {args.rows} images, extrapolated: {est:.1f} s; metadata adds {total:.2f} s = "
          f"{total / est:.1%} (target < 10%)")


if __name__ == "__main__":
    main()

"""`index` and `audit` at the scale of the full datasets, on generated images.

    python benchmarks/index_scaling.py [--images 20000] [--size 299] [--planted 200] [--workdir DIR]

Writes N distinct grayscale PNGs (smooth random fields plus film grain, 299x299 like Kaggle's
set) in the Kaggle layout, then plants duplicates of known kinds: byte-exact copies, mirrored
copies, resized copies and JPEG-re-encoded copies (saved as PNG). It then times
`python -m covidcxr.data index` and `audit` as a user runs them (subprocesses, progress bars off)
and checks that every planted pair lands in one group and that the split never separates them.
Prints seconds, images/s and peak RSS of each command.
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def _field(seed: int, size: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (6, 6)).astype(np.float32)
    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)
    mid = rng.uniform(-40, 40, (24, 24)).astype(np.float32)
    img = img + np.asarray(Image.fromarray(mid).resize((size, size), Image.BICUBIC), np.float32)
    img = img + rng.normal(0, 4, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_chunk(args) -> int:
    from PIL import Image

    root, start, stop, size = args
    for i in range(start, stop):
        cls = CLASSES[i % len(CLASSES)]
        Image.fromarray(_field(i, size), mode="L").save(Path(root) / cls / "images" / f"{cls}-{i}.png")
    return stop - start


def _plant(root: Path, n: int, size: int, total: int) -> list[tuple[str, str, str]]:
    """Copy n existing images under new names in four ways. Returns (kind, original, copy)."""
    from PIL import Image

    pairs, kinds = [], ("exact", "mirrored", "resized", "jpeg")
    for k in range(n):
        i = (7 + 37 * k) % total  # spread over classes and files
        cls = CLASSES[i % len(CLASSES)]
        src = root / cls / "images" / f"{cls}-{i}.png"
        dst = root / cls / "images" / f"{cls}-dup{k}.png"
        kind = kinds[k % len(kinds)]
        img = Image.open(src)
        if kind == "exact":
            dst.write_bytes(src.read_bytes())
        elif kind == "mirrored":
            img.transpose(Image.FLIP_LEFT_RIGHT).save(dst)
        elif kind == "resized":
            img.resize((size * 3 // 4, size * 3 // 4), Image.LANCZOS).save(dst)
        else:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=75)
            Image.open(io.BytesIO(buf.getvalue())).save(dst)
        pairs.append((kind, str(src), str(dst)))
    return pairs


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the child, and its stdout."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return wall, usage.ru_maxrss / 1024, stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--planted", type=int, default=200, help="duplicate copies to plant")
    p.add_argument("--workdir", default=None, help="where to write the images (default: a temp dir)")
    a = p.parse_args()
    import pandas as pd

    root = Path(a.workdir or tempfile.mkdtemp(prefix="covidcxr-scale-")) / "data"
    if not root.exists():
        for c in CLASSES:
            (root / c / "images").mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        step = 500
        chunks = [(str(root), s, min(s + step, a.images), a.size) for s in range(0, a.images, step)]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
            list(ex.map(_write_chunk, chunks))
        pairs = _plant(root, a.planted, a.size, a.images)
        pd.DataFrame(pairs, columns=["kind", "original", "copy"]).to_csv(root.parent / "planted.csv", index=False)
        print(f"generated {a.images} + {a.planted} images in {time.perf_counter() - t:.0f} s under {root}")
    pairs = pd.read_csv(root.parent / "planted.csv")
    n = sum(1 for _ in root.glob("*/images/*.png"))
    py = sys.executable
    manifest = root.parent / "manifest.csv"
    wall, rss, out = _run([py, "-m", "covidcxr.data", "index", str(root), "--out", str(manifest),
                           "--overwrite", "--quiet", "--split", "0.7,0.15,0.15"])
    print(f"index: {n} images in {wall:.1f} s = {n / wall:.0f} images/s, peak RSS {rss:.0f} MB")
    print("  " + "\n  ".join(line for line in out.splitlines() if line.startswith("duplicate groups")))
    df = pd.read_csv(manifest, keep_default_na=False)
    by_path = df.set_index("path")
    found = {k: 0 for k in pairs["kind"].unique()}
    for r in pairs.itertuples():
        same_group = by_path.loc[r.original, "group"] == by_path.loc[r.copy, "group"]
        same_split = by_path.loc[r.original, "split"] == by_path.loc[r.copy, "split"]
        found[r.kind] += int(same_group and same_split)
    sizes = df.groupby("group").size()
    extra = int((sizes > 1).sum()) - len(pairs)
    print("  planted pairs grouped and kept in one split: "
          + ", ".join(f"{k} {v}/{int((pairs['kind'] == k).sum())}" for k, v in found.items())
          + f"; groups beyond the planted ones: {extra}")
    wall, rss, out = _run([py, "-m", "covidcxr.data", "audit", str(root), "--quiet"])
    print(f"audit (folder): {n} images in {wall:.1f} s = {n / wall:.0f} images/s, peak RSS {rss:.0f} MB")
    wall, rss, out = _run([py, "-m", "covidcxr.data", "audit", str(manifest), "--quiet"])
    print(f"audit (manifest): {n} images in {wall:.1f} s = {n / wall:.0f} images/s, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()

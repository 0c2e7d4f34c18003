"""``predict --engine ray`` against plain ``predict --workers W`` on the same files, in one run.

    python benchmarks/ray_predict.py [--files 2000] [--arch efficientnetb0] [--size 224] [--actors 2]
        [--workers 2] [--batch 32] [--repeats 1] [--work /tmp/covidcxr-bench-ray]

The files: every real film of ../shared/data (1,610), named again through symbolic links in --work until
there are --files of them (distinct paths, so both commands score --files inputs). The model: --arch with
random weights (covidcxr.models.classifier) saved as model.keras + model_card.json, cached in --work.
Each command runs in its own process, --quiet, Parquet out; the wall time is from its start to its exit
(imports, model loads and, for Ray, ray.init and the actors' start-up included), and images/s = files /
wall. Ray's sidecar splits its own time: ``init_s`` (starting the local Ray) and ``first_rows_s`` (until
the first rows come back: the actors' start-up, model loads and first batches). The rows of the two
outputs are compared (same paths, probabilities within 1e-6). ``--repeats R`` runs R pairs, the order
alternating (plain first, then Ray first...), and reports each pair and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def films(work: Path, n: int) -> Path:
    real = sorted(p for p in SHARED.rglob("*.png") if "images" in p.parts)
    if not real:
        raise SystemExit(f"no films under {SHARED}")
    folder = work / f"films{n}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"f{i:05d}{real[i % len(real)].suffix}").symlink_to(real[i % len(real)])
    return folder


def model(work: Path, arch: str, size: int) -> Path:
    folder = work / f"{arch}-{size}"
    if not (folder / "model.keras").exists():
        code = ("import sys; from pathlib import Path; from covidcxr.artifacts import ModelCard; "
                "from covidcxr.models.classifier import build_classifier; from covidcxr.models.registry import get_spec; "
                f"s = get_spec('{arch}'); f = Path('{folder}'); f.mkdir(parents=True, exist_ok=True); "
                f"build_classifier(s, 4, {size}, None).save(f / 'model.keras'); "
                f"ModelCard(['COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia'], '{arch}', image_size={size}, "
                "normalization=s.normalization).save(f)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
    return folder


def timed(argv: list[str]) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "covidcxr.predict", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return wall, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--arch", default="efficientnetb0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", default="/tmp/covidcxr-bench-ray")
    a = ap.parse_args()
    work = Path(a.work)
    folder, m = films(work, a.files), model(work, a.arch, a.size)
    common = ["--model", str(m), str(folder), "--batch-size", str(a.batch), "--quiet", "--overwrite"]
    plain_out, ray_out = work / "plain.parquet", work / "ray.parquet"
    print(f"{a.files} files, {a.arch} at {a.size} px, batch {a.batch}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    plain_argv = [*common, "--workers", str(a.workers), "--out", str(plain_out)]
    ray_argv = [*common, "--engine", "ray", "--actors", str(a.actors), "--workers", str(a.workers),
                "--out", str(ray_out)]
    pairs = []
    for r in range(a.repeats):
        order = [("plain", plain_argv), ("ray", ray_argv)][::1 if r % 2 == 0 else -1]
        walls = {}
        for name, argv in order:
            walls[name], rc = timed(argv)
            if rc:
                raise SystemExit(f"{name} exited {rc}")
        pairs.append((walls["plain"], walls["ray"]))
        print(f"pair {r + 1} ({order[0][0]} first): plain {walls['plain']:.1f} s, ray {walls['ray']:.1f} s, "
              f"{walls['plain'] / walls['ray']:.2f}x", flush=True)
    plain = float(sorted(p for p, _ in pairs)[len(pairs) // 2])
    ray = float(sorted(r for _, r in pairs)[len(pairs) // 2])
    import numpy as np
    import pandas as pd

    p, r = pd.read_parquet(plain_out), pd.read_parquet(ray_out)
    same = list(p["path"]) == list(r["path"])
    diff = float(np.abs(p.filter(like="prob_").to_numpy() - r.filter(like="prob_").to_numpy()).max()) if same else None
    sec = json.loads((work / "ray.parquet.meta.json").read_text())["seconds"]
    print(f"medians of {len(pairs)} pair(s); ratio of medians {plain / ray:.2f}x, median of ratios "
          f"{sorted(p / r for p, r in pairs)[len(pairs) // 2]:.2f}x")
    print("| path | wall s | images/s | ratio |\n|---|---|---|---|")
    print(f"| predict --workers {a.workers} | {plain:.1f} | {a.files / plain:.1f} | 1.00x |")
    print(f"| predict --engine ray --actors {a.actors} | {ray:.1f} | {a.files / ray:.1f} | {plain / ray:.2f}x |")
    print(f"ray: {sec['init_s']:.1f} s to start a local Ray, {sec['first_rows_s']:.1f} s to the first rows (actor "
          f"start-up, model loads, first batches), {sec['seconds']:.1f} s in all inside the command; "
          f"rows identical paths: {same}, max |prob difference| {diff}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Foundation encoders on this machine: forward images/s at their native size, and a linear probe on
cached embeddings against the same probe recomputing them.

    python benchmarks/foundation_throughput.py encoders [--archs rad_dino,medsiglip,dinov2_small] [--batch 4]
    python benchmarks/foundation_throughput.py probe [--arch rad_dino] [--data ../shared/data/cxr-sample] [--size 224]

encoders: each registry encoder built from its architecture (random weights: the speed does not
depend on the values) at its native input size (rad_dino 518, medsiglip 448, DINOv2/ViT 224), one
process each; images/s of the compiled forward pass after the first (tracing) call, peak RSS.

probe: ``python -m covidcxr.train --freeze-encoder`` twice on the same data and encoder (a fresh
embedding cache, then the filled one): the first run computes every image's embedding, the second
reads them all from the cache; the wall time of each whole command and of its head training.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import children  # noqa: E402
from benchmarks.train_throughput import run_child  # noqa: E402

NATIVE = {"rad_dino": 518, "medsiglip": 448}


def encoder_worker(a) -> None:
    import keras
    import numpy as np

    from covidcxr.training.embeddings import pooled_feature_model
    from covidcxr.models.registry import get_spec

    spec = get_spec(a.arch)
    size = NATIVE.get(a.arch, 224)
    t0 = time.perf_counter()
    model, _ = pooled_feature_model(spec, size, None)
    build = time.perf_counter() - t0
    x = (np.random.default_rng(0).random((a.batch, size, size, 1)) * 255).astype("float32")
    t0 = time.perf_counter()
    model.predict_on_batch(x)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        keras.ops.convert_to_numpy(model.predict_on_batch(x))
    step = (time.perf_counter() - t0) / a.steps
    print("RESULT " + json.dumps({"arch": a.arch, "size": size, "params_m": round(model.count_params() / 1e6, 1),
                                  "build_s": round(build, 1), "first_call_s": round(first, 1),
                                  "images_per_s": round(a.batch / step, 2)}), flush=True)


def encoders(a) -> None:
    print("| encoder | input px | params (M) | build s | first call s | images/s (forward) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for arch in a.archs.split(","):
        cmd = [sys.executable, __file__, "_encoder_worker", "--arch", arch, "--batch", str(a.batch),
               "--steps", str(a.steps)]
        rc, wall, rss, text = run_child(cmd, timeout=a.timeout)
        r = children.result(text)
        if rc == 0 and r:
            print(f"| {arch} | {r['size']} | {r['params_m']} | {r['build_s']} | {r['first_call_s']} | "
                  f"{r['images_per_s']} | {rss:.0f} |", flush=True)
        else:
            print(f"| {arch} | | | | | not measured (exit {rc}: {text.strip()[-200:]}) | |", flush=True)


def probe(a) -> None:
    work = Path(tempfile.mkdtemp(prefix="covidcxr-probe-"))
    base = [sys.executable, "-m", "covidcxr.train", "--data", a.data, "--arch", a.arch, "--weights", "none",
            "--freeze-encoder", "--image-size", str(a.size), "--batch-size", "32", "--epochs", str(a.epochs),
            "--export-dir", "none", "--cache-dir", str(work / "cache")]
    rows = []
    for name in ("first (computes embeddings)", "second (cached embeddings)"):
        rc, wall, rss, text = run_child(base + ["--run-dir", str(work / name.split()[0])])
        if rc:
            sys.exit(text[-3000:])
        emb = re.search(r"(\d+) of (\d+) images reused, (\d+) computed in ([\d.]+) s", text)
        head = re.search(r"phase \w+: (\d+) epochs, ([\d.]+) images/s", text)
        rows.append((name, wall, emb, head, rss))
    print(f"{a.arch} at {a.size} px, weights none (speed only), {a.epochs} head epochs, data {a.data}")
    print("| run | whole command s | embeddings reused / computed | embedding s | head images/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, wall, emb, head, rss in rows:
        print(f"| {name} | {wall:.1f} | {emb.group(1)} / {emb.group(3)} | {float(emb.group(4)):.1f} | "
              f"{float(head.group(2)):.0f} | {rss:.0f} |")
    print(f"second run / first run wall time: {rows[1][1] / rows[0][1]:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["encoders", "probe", "_encoder_worker"])
    p.add_argument("--archs", default="rad_dino,medsiglip,dinov2_small")
    p.add_argument("--arch", default="rad_dino")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-sample"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args()
    {"encoders": encoders, "probe": probe, "_encoder_worker": encoder_worker}[a.mode](a)


if __name__ == "__main__":
    main()

"""``predict --engine onnx`` against the ``.keras`` path: images/s of ``python -m covidcxr.predict`` on the same
real files, each engine in a process of its own, for random-init classifiers (issue 23).

    python benchmarks/onnx_predict.py [--archs efficientnetb0,resnet50] [--data ../shared/data/cxr-sample]
        [--limit 160] [--size 224] [--batch 32]

Each architecture is built once with random weights and exported with ``--format onnx`` (model.keras,
model.onnx checked against Keras on two of the files), cached in --work. Then ``covidcxr.predict.main`` runs
on the files with ``--engine keras`` and ``--engine onnx`` (predict_throughput.py's ``_cli`` child: steady-state
images/s after the first batch, and the whole command's wall time and peak RSS). ratio = ONNX / Keras.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import children  # noqa: E402
from benchmarks import predict_throughput as pt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="efficientnetb0,resnet50")
    p.add_argument("--data", default=str(pt.DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=160)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "covidcxr-onnx-bench"))
    p.add_argument("--timeout", type=float, default=1200)
    a = p.parse_args()
    a.backend, a.formats = "tensorflow", "onnx"
    files = pt.image_files(Path(a.data), a.limit)
    print(f"{len(files)} files from {a.data}, {a.size} px, batch {a.batch}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    models = {arch: pt.ensure_model(a, arch, a.size, files) for arch in a.archs.split(",")}
    print("| arch | .keras images/s | ONNX images/s | ratio | .keras wall s | ONNX wall s | .keras peak RSS MB | "
          "ONNX peak RSS MB |\n|---|---|---|---|---|---|---|---|", flush=True)
    for arch, model in models.items():
        got = {}
        for kind in ("keras", "onnx"):
            rc, _, rss, text = pt.run_child(pt.child("cli", a, model=model, files=files, kind=kind), a.backend,
                                            a.timeout)
            r = children.result(text)
            if rc or r is None or r["rc"] != 0:
                print(f"| {arch} | {kind} failed (exit {rc}): {text.strip()[-300:]} |", flush=True)
                break
            got[kind] = (r, rss)
        if len(got) == 2:
            (k, krss), (o, orss) = got["keras"], got["onnx"]
            print(f"| {arch} | {k['images_per_s']:.1f} | {o['images_per_s']:.1f} | "
                  f"{o['images_per_s'] / k['images_per_s']:.2f}x | {k['wall_s']:.1f} | {o['wall_s']:.1f} | {krss:.0f} | "
                  f"{orss:.0f} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

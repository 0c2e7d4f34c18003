"""Prediction speed and memory: `python -m covidcxr.predict` (the CLI's code path, on files)
against the same model's batched `model.predict` on preloaded arrays, and peak RSS against the
number of files.

    # images/s of predict on real files vs model.predict on preloaded uint8 [N, S, S, 1]
    python benchmarks/predict_throughput.py speed [--archs efficientnetb0,resnet50] [--kinds keras,savedmodel]
        [--data ../shared/data/cxr-sample] [--limit 320] [--size 224] [--batch 32] [--backend tensorflow|jax]
    # peak RSS of predict over 1,000 and 20,000 generated files (tiny model, a fresh process each)
    python benchmarks/predict_throughput.py memory [--counts 1000,20000] [--arch mobilenetv3small] [--size 32]

speed: each architecture is built once with random weights (covidcxr.models.classifier) under
TensorFlow, saved as model.keras + model_card.json and exported as a SavedModel
(covidcxr.exporting), cached in --work. Then, each in its own process on --backend: the baseline
decodes --limit images with the training preprocessing into one uint8 array, runs `model.predict`
on one batch (tracing) and times `model.predict` over the rest; the CLI run calls
`covidcxr.predict.main` on the files (--quiet, CSV out) with `inference.Predictor.run` wrapped only
to timestamp each finished batch, and reports the images after the first batch over the time from
the first batch to the last (steady state, as the baseline), plus the whole command's wall time
(imports, model load, first-batch tracing). Use a --limit that is a multiple of --batch so neither
side pays for a second batch shape. The baseline also times a plain `predict_on_batch` loop over
the same batches (the model's batched step rate). ratio = CLI images/s / baseline images/s.

memory: writes max(--counts) tiny PNGs once, then runs the CLI over the first C of them for each
C, one process each; the peak RSS comes from `os.wait4` (the child's own maximum resident set).

GPU: `--backend jax` on a GPU machine runs the same comparison against the model's batched step
rate there (nothing here hides the GPUs; JAX and TensorFlow are told not to preallocate memory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import children  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr-sample"
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


def env(backend: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def run_child(cmd: list[str], backend: str, timeout: float | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak RSS MB, output) of a child on ``backend``."""
    return children.run_child(cmd, env(backend), timeout)


def image_files(data: Path, limit: int) -> list[str]:
    """The first ``limit`` images of ``data`` in sorted order (mask folders left out)."""
    from covidcxr.data.imageio import is_image_file

    files = sorted(str(f) for f in data.rglob("*") if is_image_file(f) and "masks" not in f.parts)
    if len(files) < limit:
        raise SystemExit(f"{data} holds {len(files)} images, fewer than --limit {limit}")
    return files[:limit]


# ---------------------------------------------------------------- children


def build_worker(a) -> None:
    """A random-weight classifier: model.keras + model_card.json (+ serving/1 unless --no-export)."""
    from covidcxr.artifacts import ModelCard, locate
    from covidcxr.exporting.savedmodel import export_model
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    spec, out = get_spec(a.arch), Path(a.out)
    src = out.with_name(out.name + "_src") if a.export else out
    src.mkdir(parents=True, exist_ok=True)
    build_classifier(spec, len(CLASSES), a.size, None).save(src / "model.keras")
    ModelCard(CLASSES, a.arch, image_size=a.size, normalization=spec.normalization).save(src)
    if a.export:
        export_model(locate(src), out, overwrite=True, checks=a.files[:2], formats=tuple(a.formats.split(",")))


def baseline_worker(a) -> None:
    """model.predict on the files' preprocessed pixels, preloaded: one traced batch, then the rest timed."""
    import numpy as np

    from covidcxr.artifacts import ModelCard
    from covidcxr.data import preprocess as P
    from covidcxr.data.imageio import read_image
    from covidcxr.inference import load_keras

    card = ModelCard.load(a.model)
    x = np.stack([P.prepare(read_image(f), card.image_size, card.contrast) for f in a.files])[..., None]
    model = load_keras(Path(a.model) / "model.keras")
    model.predict(x[:a.batch], batch_size=a.batch, verbose=0)
    t = time.perf_counter()
    model.predict(x[a.batch:], batch_size=a.batch, verbose=0)
    rate = (len(x) - a.batch) / (time.perf_counter() - t)
    model.predict_on_batch(x[:a.batch])
    t = time.perf_counter()
    for i in range(a.batch, len(x) - a.batch + 1, a.batch):
        model.predict_on_batch(x[i:i + a.batch])
    steps = (len(x) - a.batch) // a.batch
    print("RESULT " + json.dumps({"images_per_s": rate, "step_images_per_s": steps * a.batch / (time.perf_counter() - t)}),
          flush=True)


def cli_worker(a) -> None:
    """``covidcxr.predict.main`` on the files, timing each batch the Predictor hands back."""
    from covidcxr import inference, predict

    stamps, run = [], inference.Predictor.run

    def timed(self, items, **kw):
        for batch in run(self, items, **kw):
            stamps.append((time.perf_counter(), len(batch.done)))
            yield batch

    inference.Predictor.run = timed
    out = Path(tempfile.mkdtemp()) / "p.csv"
    t = time.perf_counter()
    rc = predict.main(["--model", a.model, *a.files, "--out", str(out), "--batch-size", str(a.batch), "--quiet",
                       "--prefer", a.kind])
    wall = time.perf_counter() - t
    n = sum(k for _, k in stamps[1:])
    print("RESULT " + json.dumps({"rc": rc, "wall_s": wall, "rows": sum(k for _, k in stamps),
                                  "images_per_s": n / (stamps[-1][0] - stamps[0][0])}), flush=True)


# ---------------------------------------------------------------- modes


def child(mode: str, a, **extra) -> list[str]:
    cmd = [sys.executable, __file__, f"_{mode}", "--backend", a.backend, "--batch", str(a.batch)]
    for k, v in extra.items():
        cmd += [f"--{k}", *v] if isinstance(v, list) else [f"--{k}", str(v)]
    return cmd


def ensure_model(a, arch: str, size: int, files: list[str], export: bool = True) -> Path:
    out = Path(a.work) / f"{arch}-{size}" if a.formats == "savedmodel" else Path(a.work) / f"{arch}-{size}-{a.formats}"
    if not (out / "model_card.json").exists():
        rc, wall, _, text = run_child(child("build", a, arch=arch, size=size, out=out, files=files[:2],
                                            formats=a.formats)
                                      + ([] if export else ["--no-export"]), "tensorflow")
        if rc != 0:
            raise SystemExit(f"building {arch} failed (exit {rc}): {text[-2000:]}")
        print(f"built {arch} at {size} px in {wall:.0f} s: {out}", flush=True)
    return out


def speed(a) -> None:
    files = image_files(Path(a.data), a.limit)
    print(f"{len(files)} files from {a.data}, {a.size} px, batch {a.batch}, backend {a.backend}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    models = {arch: ensure_model(a, arch, a.size, files) for arch in a.archs.split(",")}
    print("| arch | model | predict CLI images/s | CLI wall s (whole command) | model.predict images/s | ratio | "
          "predict_on_batch loop images/s | ratio | CLI peak RSS MB |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for arch, model in models.items():
        rc, _, _, text = run_child(child("baseline", a, model=model, files=files), a.backend, a.timeout)
        base = children.result(text)
        if rc or base is None:
            print(f"| {arch} | baseline failed (exit {rc}): {text.strip()[-300:]} |", flush=True)
            continue
        for kind in a.kinds.split(","):
            rc, _, rss, text = run_child(child("cli", a, model=model, files=files, kind=kind), a.backend, a.timeout)
            r = children.result(text)
            if rc or r is None or r["rc"] != 0:
                print(f"| {arch} | {kind} | failed (exit {rc}): {text.strip()[-300:]} |", flush=True)
                continue
            cli, b, step = r["images_per_s"], base["images_per_s"], base["step_images_per_s"]
            print(f"| {arch} | {kind} | {cli:.1f} | {r['wall_s']:.1f} | {b:.1f} | {cli / b:.2f}x | {step:.1f} | "
                  f"{cli / step:.2f}x | {rss:.0f} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)


def memory(a) -> None:
    import numpy as np
    from PIL import Image

    counts = sorted(int(c) for c in a.counts.split(","))
    pool = Path(a.work) / "mem-files"
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(len(list(pool.glob("*.png"))), counts[-1]):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(pool / f"{i:06d}.png")
    model = ensure_model(a, a.arch, a.size, [], export=False)
    print(f"{a.arch} at {a.size} px, batch {a.batch}, backend {a.backend}\n"
          f"| files | wall s | images/s (whole command) | peak RSS MB | vs {counts[0]} files |\n|---|---|---|---|---|")
    first = None
    for c in counts:
        folder = Path(a.work) / f"mem-{c}"
        if not folder.is_dir():
            folder.mkdir()
            for i in range(c):
                os.link(pool / f"{i:06d}.png", folder / f"{i:06d}.png")
        out = Path(tempfile.mkdtemp()) / "p.csv"
        cmd = [sys.executable, "-m", "covidcxr.predict", "--model", str(model), str(folder), "--out", str(out),
               "--batch-size", str(a.batch), "--quiet"]
        rc, wall, rss, text = run_child(cmd, a.backend, a.timeout)
        if rc != 0:
            print(f"| {c} | failed (exit {rc}): {text.strip()[-300:]} |", flush=True)
            continue
        first = first or rss
        print(f"| {c} | {wall:.1f} | {c / wall:.0f} | {rss:.0f} | {100 * (rss / first - 1):+.1f}% |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["speed", "memory", "_build", "_baseline", "_cli"])
    p.add_argument("--archs", default="efficientnetb0,resnet50")
    p.add_argument("--arch", default="mobilenetv3small")
    p.add_argument("--kinds", default="keras,savedmodel")
    p.add_argument("--kind", default="keras")
    p.add_argument("--formats", default="savedmodel", help="export formats of the built models (savedmodel,onnx)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=320)
    p.add_argument("--size", type=int, default=None, help="default 224 (speed), 32 (memory)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax"])
    p.add_argument("--counts", default="1000,20000")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "covidcxr-predict-bench"))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--model"), p.add_argument("--out"), p.add_argument("--files", nargs="*", default=[])
    p.add_argument("--no-export", dest="export", action="store_false")
    a = p.parse_args()
    a.size = a.size or (32 if a.mode == "memory" else 224)
    {"speed": speed, "memory": memory, "_build": build_worker, "_baseline": baseline_worker,
     "_cli": cli_worker}[a.mode](a)


if __name__ == "__main__":
    main()

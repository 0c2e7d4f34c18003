"""Training speed and memory on this machine: every registered architecture, and covidcxr's
training path against the previous tf.data path in the same run.

    # steady-state training images/s, s/step and peak RSS per architecture (fresh process each)
    python benchmarks/train_throughput.py sweep [--archs resnet50,efficientnetb0] [--size 224] [--batch 32]
    # `python -m covidcxr.train` against the previous tf.data + fit path, same images, model, recipe, epochs
    python benchmarks/train_throughput.py versus [--arch efficientnetb0] [--data DIR] [--epochs 4]

sweep: build with weights none, wrap in the Trainee (augmentation inside the step), compile as
covidcxr.train does, ``fit`` on cached uint8 batches; the first step (tracing) is timed apart.

versus: ours is the whole CLI in a subprocess (index, cache build, the loop with its validation
pass and checkpoints); the baseline (benchmarks/tfdata_baseline.py) decodes and caches in tf.data,
augments each batch on the CPU and fits the same backbone and head on float RGB. Both report
training images/s over their training steps (all epochs, and after the first, which pays for
tracing) and the peak RSS of their process; ours also reports its cache build apart.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import children  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_child(cmd: list[str], timeout: float | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak RSS MB, output) of a child on the CPU (``children.run_child`` with ENV)."""
    return children.run_child(cmd, ENV, timeout)


def _synthetic(n_per_class: int) -> Path:
    from covidcxr.data.synth import write_synthetic_dataset

    return write_synthetic_dataset(Path(tempfile.mkdtemp()) / "syn", per_class=n_per_class, size=256, seed=0,
                                   progress=False)


# ---------------------------------------------------------------- sweep


def sweep_worker(a) -> None:
    """One architecture, in this process. Prints one JSON line."""
    import keras
    import numpy as np

    from covidcxr.config import TrainConfig
    from covidcxr.data.manifest import build_manifest
    from covidcxr.augment import Augment
    from covidcxr.training.data import Batches, open_run_data
    from covidcxr.training.phases import Phase, make_optimizer
    from covidcxr.tasks import get_task
    from covidcxr.training.trainee import Trainee

    data = Path(a.data) if a.data else _synthetic(a.batch // 4 + 1)
    df, _ = build_manifest(data, (1.0, 0.0, 0.0), progress=False)
    classes = sorted(df["label"].unique())
    rd = open_run_data(df.head(a.batch), classes, a.size, "none", cache_dir=Path(tempfile.mkdtemp()), progress=False)
    cfg, task = TrainConfig(arch=a.arch, image_size=a.size, batch_size=a.batch), get_task("classify")
    t0 = time.perf_counter()
    net = task.build(a.arch, a.size, len(classes), None, cfg.dropout, cfg.bn_momentum)
    trainee = Trainee(net, Augment(seed=0), task)
    trainee.compile(optimizer=make_optimizer(Phase("scratch", 1, cfg.lr), 1, cfg.weight_decay),
                    **task.compile_args(cfg))
    build_s = time.perf_counter() - t0
    batches = Batches(rd, np.arange(a.batch), a.batch, shuffle=True)
    times = []
    for e in range(a.steps + 1):
        batches.set_epoch(e)
        t = time.perf_counter()
        trainee.fit(batches, epochs=1, verbose=0, shuffle=False)
        times.append(time.perf_counter() - t)
    steady = float(np.mean(times[1:]))
    print("RESULT " + json.dumps({
        "arch": a.arch, "params_m": round(net.count_params() / 1e6, 1), "build_s": round(build_s, 1),
        "first_step_s": round(times[0], 1), "s_per_step": round(steady, 2), "images_per_s": round(a.batch / steady, 2),
        "backend": keras.backend.backend()}), flush=True)


def sweep(a) -> None:
    from covidcxr.models.registry import arch_names

    archs = a.archs.split(",") if a.archs else arch_names()
    print("| arch | params (M) | build s | first step s (trace) | s/step | images/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for arch in archs:
        cmd = [sys.executable, __file__, "_sweep_worker", "--arch", arch, "--size", str(a.size),
               "--batch", str(a.batch), "--steps", str(a.steps)] + (["--data", a.data] if a.data else [])
        rc, wall, rss, text = run_child(cmd, timeout=a.timeout)
        r = children.result(text)
        if rc == 0 and r:
            print(f"| {arch} | {r['params_m']} | {r['build_s']} | {r['first_step_s']} | {r['s_per_step']} | "
                  f"{r['images_per_s']} | {rss:.0f} |", flush=True)
        else:
            why = f"killed after {a.timeout:.0f} s" if rc in (-9, 137) else f"exit {rc}: {text.strip()[-300:]}"
            print(f"| {arch} | | | | | not measured ({why}) | |", flush=True)


# ---------------------------------------------------------------- versus the previous tf.data path


def tfdata_worker(a) -> None:
    """The previous path on the run's train/val images: tf.data decode + cache + CPU augmentation + fit."""
    import keras
    import numpy as np
    import pandas as pd

    from benchmarks.tfdata_baseline import dataset
    from covidcxr.models.registry import build_backbone, get_spec

    spec = get_spec(a.arch)
    df = pd.read_csv(a.manifest, dtype=str, keep_default_na=False)
    classes = sorted(df["label"].unique())
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]
    lab = lambda d: np.array([classes.index(c) for c in d["label"]])  # noqa: E731
    keras.utils.set_random_seed(0)
    inp = keras.Input((a.size, a.size, 3))
    x = keras.layers.GlobalAveragePooling2D()(build_backbone(spec, a.size, None)(inp))
    x = keras.layers.Dropout(0.3)(keras.layers.BatchNormalization()(x))
    model = keras.Model(inp, keras.layers.Dense(len(classes), activation="softmax")(x))
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(optimizer=keras.optimizers.AdamW(5e-4, weight_decay=1e-6),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    train = dataset(tr["path"].tolist(), lab(tr), len(classes), a.size, a.batch, spec.normalization)
    val = dataset(va["path"].tolist(), lab(va), len(classes), a.size, a.batch, spec.normalization, training=False)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(self.last - self.t)

    model.fit(train, validation_data=val, epochs=a.epochs, callbacks=[Timer()], verbose=2)
    n = len(tr)
    print(f"RESULT {len(times) * n / sum(times):.2f} {(len(times) - 1) * n / sum(times[1:]):.2f} "
          f"first-epoch-decode {n / times[0]:.1f}", flush=True)


def versus(a) -> None:
    work = Path(tempfile.mkdtemp(prefix="covidcxr-bench-"))
    data = a.data or str(_synthetic(a.per_class))
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "covidcxr.train", "--data", data, "--arch", a.arch, "--weights", "none",
           "--image-size", str(a.size), "--batch-size", str(a.batch), "--epochs", str(a.epochs),
           "--fine-tune-epochs", "0", "--patience", str(a.epochs + 1), "--run-dir", str(run_dir),
           "--export-dir", "none", "--cache-dir", str(work / "cache")]
    print("ours:", shlex.join(cmd), flush=True)
    rc, wall, rss, text = run_child(cmd)
    if rc:
        sys.exit(text[-3000:])
    m = re.search(r"([\d.]+) images/s \(training\)(?:, ([\d.]+) after the first epoch)?", text)
    ours, ours_steady = float(m.group(1)), float(m.group(2) or "nan")
    built = re.search(r"built in ([\d.]+) s, (\d+) of", text)
    cmd2 = [sys.executable, __file__, "_tfdata_worker", "--arch", a.arch, "--manifest", str(run_dir / "manifest.csv"),
            "--size", str(a.size), "--batch", str(a.batch), "--epochs", str(a.epochs)]
    rc2, wall2, rss2, text2 = run_child(cmd2)
    if rc2:
        sys.exit(text2[-3000:])
    m2 = re.search(r"RESULT ([\d.]+) ([\d.na]+) first-epoch-decode ([\d.]+)", text2)
    base, base_steady = float(m2.group(1)), float(m2.group(2))
    print(f"data {data}, {a.size} px, batch {a.batch}, {a.epochs} epochs, {a.arch} from scratch, {os.cpu_count()} cores")
    print("| path | training images/s, all epochs | after the first epoch | wall s (whole command) | peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| covidcxr.train (cache + accelerator-side augmentation) | {ours:.2f} | {ours_steady:.2f} | {wall:.0f} | "
          f"{rss:.0f} |")
    print(f"| previous tf.data path + fit | {base:.2f} | {base_steady:.2f} | {wall2:.0f} | {rss2:.0f} |")
    print(f"ratio ours/previous: {ours / base:.2f}x over all epochs, {ours_steady / base_steady:.2f}x after the "
          f"first; memory {rss / rss2:.2f}x")
    if built:
        print(f"cache build (reported apart): {built.group(2)} images in {built.group(1)} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sweep", "versus", "_sweep_worker", "_tfdata_worker"])
    p.add_argument("--archs", default=None, help="sweep: comma-separated names (default: all registered)")
    p.add_argument("--arch", default="efficientnetb0")
    p.add_argument("--data", default=None, help="dataset folder (default: synthetic images)")
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="sweep: timed steps after the first")
    p.add_argument("--epochs", type=int, default=4, help="versus: epochs for both paths")
    p.add_argument("--per-class", type=int, default=70, help="versus: synthetic images per class without --data")
    p.add_argument("--timeout", type=float, default=300, help="sweep: seconds per architecture")
    a = p.parse_args()
    {"sweep": sweep, "versus": versus, "_sweep_worker": sweep_worker, "_tfdata_worker": tfdata_worker}[a.mode](a)


if __name__ == "__main__":
    main()

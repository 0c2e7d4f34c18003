"""Training speed and memory: every registered architecture, and the default recipe
against a plain Keras `image_dataset_from_directory` + `fit` baseline.

    # images/s, s/step and peak RSS per architecture (fresh process each, weights none)
    python benchmarks/train_throughput.py sweep [--archs resnet50,efficientnetb0] [--size 224] [--batch 32]
    # our `python -m covidcxr.train` against a plain fit of the same backbone, same images, same epochs
    python benchmarks/train_throughput.py baseline [--arch resnet50] [--data DIR] [--epochs 2]
    # steady-state s/step of the plain model/compile against ours, one recipe difference at a time
    python benchmarks/train_throughput.py factors [--arch efficientnetb0] [--steps 6]

sweep: each architecture runs in its own process (so peak RSS is its own): build with
weights none, compile as `covidcxr.train` does (AdamW, label smoothing, accuracy + AUC), then
`fit` on batches from the covidcxr pipeline. The first step (graph tracing) is timed apart;
images/s comes from the next --steps steps.

baseline: runs `python -m covidcxr.train --data DATA --arch ARCH --weights none --epochs E
--fine-tune-epochs 0` (the whole CLI: index, pipeline, validation metrics each epoch,
checkpoints) and, in a second process, the textbook script: `image_dataset_from_directory`
over the same training images (the run's manifest, linked into class folders), the same
`keras.applications` backbone with a GAP/dense head, Adam, one `fit` with the same validation
images. Both report images/s over their training steps (all epochs, and the epochs after the
first, which pays for graph tracing) and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_child(cmd: list[str], timeout: float | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak RSS MB, stdout+stderr) of a child process."""
    import threading

    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and returns its own peak RSS
        if timer:
            timer.cancel()
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read()
    return rc, wall, usage.ru_maxrss / 1024, text


def step_times(model, ds, **fit_kwargs) -> list[float]:
    """Seconds of each training step of one epoch of ``model.fit(ds)`` (the first includes tracing)."""
    import keras

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(ds, epochs=1, verbose=0, callbacks=[Timer()], **fit_kwargs)
    return times


# ---------------------------------------------------------------- sweep


def sweep_worker(a) -> None:
    """One architecture, in this process. Prints one JSON line."""
    import numpy as np

    from covidcxr.config import TrainConfig
    from covidcxr.data.manifest import build_manifest
    from covidcxr.data.pipeline import make_dataset
    from covidcxr.data.synth import write_synthetic_dataset
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec
    from covidcxr.train import _compile

    spec = get_spec(a.arch)
    data = Path(a.data) if a.data else write_synthetic_dataset(
        Path(tempfile.mkdtemp()) / "syn", per_class=a.batch // 4 + 1, size=256, seed=0, progress=False)
    df, _ = build_manifest(data, (1.0, 0.0, 0.0), progress=False)
    classes = sorted(df["label"].unique())
    ds = make_dataset(df.head(a.batch), classes, image_size=a.size, normalization=spec.normalization,
                      batch_size=a.batch, training=True, cache="memory", repeat=True)
    cfg = TrainConfig(arch=a.arch, image_size=a.size, batch_size=a.batch)
    t0 = time.perf_counter()
    model = build_classifier(spec, len(classes), a.size, None, bn_momentum=cfg.bn_momentum, dropout=cfg.dropout)
    _compile(model, cfg, cfg.lr)
    build_s = time.perf_counter() - t0
    times = step_times(model, ds, steps_per_epoch=a.steps + 1)
    steady = float(np.mean(times[1:]))
    print("RESULT " + json.dumps({
        "arch": a.arch, "params_m": round(model.count_params() / 1e6, 1), "build_s": round(build_s, 1),
        "first_step_s": round(times[0], 1), "s_per_step": round(steady, 2),
        "images_per_s": round(a.batch / steady, 2)}), flush=True)


def sweep(a) -> None:
    from covidcxr.models.registry import registry

    archs = a.archs.split(",") if a.archs else list(registry())
    print(f"| arch | params (M) | build s | first step s (trace) | s/step | images/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for arch in archs:
        cmd = [sys.executable, __file__, "_sweep_worker", "--arch", arch, "--size", str(a.size),
               "--batch", str(a.batch), "--steps", str(a.steps)] + (["--data", a.data] if a.data else [])
        rc, wall, rss, text = run_child(cmd, timeout=a.timeout)
        m = re.search(r"^RESULT (.*)$", text, re.M)
        if rc == 0 and m:
            r = json.loads(m.group(1))
            print(f"| {arch} | {r['params_m']} | {r['build_s']} | {r['first_step_s']} | {r['s_per_step']} | "
                  f"{r['images_per_s']} | {rss:.0f} |", flush=True)
        else:
            why = f"killed after {a.timeout:.0f} s" if rc in (-9, 137) else f"exit {rc}: {text.strip()[-300:]}"
            print(f"| {arch} | | | | | not measured ({why}) | |", flush=True)


# ---------------------------------------------------------------- factors


def plain_classifier(app, size: int, n_classes: int, front=None):
    """The textbook model: a keras.applications backbone ``app`` (random init), global pooling,
    BatchNormalization, dropout, softmax; ``front`` maps the input tensor first (augmentation)."""
    import keras

    inp = keras.Input((size, size, 3))
    x = app(include_top=False, weights=None, input_shape=(size, size, 3))(front(inp) if front else inp)
    x = keras.layers.Dropout(0.3)(keras.layers.BatchNormalization()(keras.layers.GlobalAveragePooling2D()(x)))
    return keras.Model(inp, keras.layers.Dense(n_classes, activation="softmax")(x))


def factors(a) -> None:
    """Steady-state s/step on one fixed in-memory batch (no input pipeline), so that only the
    compiled training step differs: the plain script's model and compile against ours, then ours
    with one difference removed at a time. Median of --steps steps after the first."""
    import keras
    import numpy as np
    import tensorflow as tf

    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    spec = get_spec(a.arch)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (a.batch, a.size, a.size, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, a.batch)]
    w = np.ones(a.batch, "float32")

    plain_model = lambda: plain_classifier(getattr(keras.applications, spec.constructor), a.size, 3)  # noqa: E731
    ours = lambda: build_classifier(spec, 3, a.size, None, bn_momentum=0.9)  # noqa: E731
    adamw = lambda: keras.optimizers.AdamW(5e-4, weight_decay=1e-6)  # noqa: E731
    smooth = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
    runs = [("plain script: Adam, cross-entropy, no sample weights", plain_model, keras.optimizers.Adam, "cce", False),
            ("ours: AdamW, label smoothing 0.1, class weights, BN momentum 0.9", ours, adamw, smooth, True),
            ("ours with Adam", ours, keras.optimizers.Adam, smooth, True),
            ("ours without sample weights", ours, adamw, smooth, False),
            ("ours without label smoothing", ours, adamw, "cce", True),
            ("plain script again (order effects)", plain_model, keras.optimizers.Adam, "cce", False)]
    print(f"{a.arch}, {a.size} px, batch {a.batch}, weights none; median of {a.steps} steps after the first")
    print("| training step | first step s | s/step | images/s |\n|---|---|---|---|", flush=True)
    for name, build, opt, loss, sw in runs:
        keras.utils.set_random_seed(0)
        model = build()
        model.compile(optimizer=opt(), loss="categorical_crossentropy" if loss == "cce" else loss,
                      metrics=["accuracy", keras.metrics.AUC(name="auc")])
        ds = tf.data.Dataset.from_tensors((x, y, w) if sw else (x, y)).repeat(a.steps + 1)
        times = step_times(model, ds)
        step = float(np.median(times[1:]))
        print(f"| {name} | {times[0]:.1f} | {step:.3f} | {a.batch / step:.2f} |", flush=True)


# ---------------------------------------------------------------- baseline


def baseline_worker(a) -> None:
    """The textbook Keras script, on the class folders in a.folders."""
    import keras

    from covidcxr.callbacks import PhaseLog
    from covidcxr.models.registry import get_spec

    spec = get_spec(a.arch)
    kw = dict(image_size=(a.size, a.size), batch_size=a.batch, color_mode="rgb", label_mode="categorical", seed=0)
    train = keras.utils.image_dataset_from_directory(Path(a.folders) / "train", shuffle=True, **kw)
    val = keras.utils.image_dataset_from_directory(Path(a.folders) / "val", shuffle=False, **kw)
    n_classes = len(train.class_names)
    app = {"resnet50": keras.applications.ResNet50, "efficientnetb0": keras.applications.EfficientNetB0,
           "densenet121": keras.applications.DenseNet121, "mobilenetv3small": keras.applications.MobileNetV3Small,
           "convnexttiny": keras.applications.ConvNeXtTiny, "resnet101": keras.applications.ResNet101}[a.arch]
    pre = {"resnet50": keras.applications.resnet.preprocess_input,
           "resnet101": keras.applications.resnet.preprocess_input,
           "densenet121": keras.applications.densenet.preprocess_input}.get(a.arch, lambda x: x)
    aug = keras.Sequential([keras.layers.RandomRotation(0.02), keras.layers.RandomZoom(0.1),
                            keras.layers.RandomContrast(0.15)])
    model = plain_classifier(app, a.size, n_classes, front=lambda x: keras.layers.Lambda(pre)(aug(x)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
    n = sum(1 for _ in (Path(a.folders) / "train").glob("*/*"))
    log = PhaseLog("scratch", n)  # the same measure covidcxr.train prints
    model.fit(train, validation_data=val, epochs=a.epochs, callbacks=[log], verbose=2)
    steady = log.steady_images_per_second or float("nan")
    print(f"RESULT {log.images_per_second:.2f} images/s (training steps), {steady:.2f} after the first epoch",
          flush=True)


def baseline(a) -> None:
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="covidcxr-bench-"))
    data = a.data
    if data is None:
        from covidcxr.data.synth import write_synthetic_dataset

        data = str(write_synthetic_dataset(work / "syn", per_class=a.per_class, size=256, seed=0, progress=False))
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "covidcxr.train", "--data", data, "--arch", a.arch, "--weights", "none",
           "--image-size", str(a.size), "--batch-size", str(a.batch), "--epochs", str(a.epochs),
           "--fine-tune-epochs", "0", "--run-dir", str(run_dir), "--export-dir", "none"]
    print("ours:", " ".join(cmd), flush=True)
    rc, wall, rss, text = run_child(cmd)
    if rc:
        sys.exit(text[-3000:])
    m = re.search(r"([\d.]+) images/s \(training steps\)(?:, ([\d.]+) after the first epoch)?", text)
    ours, ours_steady = float(m.group(1)), float(m.group(2) or "nan")
    # The same training and validation images, as class folders for image_dataset_from_directory.
    df = pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)
    folders = work / "folders"
    for r in df[df["split"].isin(["train", "val"])].itertuples():
        d = folders / r.split / r.label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{r.Index}{Path(r.path).suffix}").symlink_to(Path(r.path).resolve())
    cmd2 = [sys.executable, __file__, "_baseline_worker", "--arch", a.arch, "--folders", str(folders),
            "--size", str(a.size), "--batch", str(a.batch), "--epochs", str(a.epochs)]
    rc2, wall2, rss2, text2 = run_child(cmd2)
    if rc2:
        sys.exit(text2[-3000:])
    m2 = re.search(r"RESULT ([\d.]+) images/s \(training steps\), ([\d.na]+) after", text2)
    base, base_steady = float(m2.group(1)), float(m2.group(2))
    n_train = int((df["split"] == "train").sum())
    print(f"data {data}: {n_train} train / {int((df['split'] == 'val').sum())} val images, {a.size} px, "
          f"batch {a.batch}, {a.epochs} epochs, arch {a.arch}, weights none")
    print("| path | training images/s (all epochs) | after the first epoch | wall s (whole command) | peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| covidcxr.train (default recipe) | {ours:.2f} | {ours_steady:.2f} | {wall:.0f} | {rss:.0f} |")
    print(f"| image_dataset_from_directory + fit | {base:.2f} | {base_steady:.2f} | {wall2:.0f} | {rss2:.0f} |")
    print(f"speed ratio ours/baseline {ours / base:.2f}x (after the first epoch {ours_steady / base_steady:.2f}x), "
          f"memory ratio {rss / rss2:.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sweep", "baseline", "factors", "_sweep_worker", "_baseline_worker"])
    p.add_argument("--archs", default=None, help="sweep: comma-separated names (default: all registered)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--data", default=None, help="dataset folder (default: synthetic images)")
    p.add_argument("--folders", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="sweep/factors: timed steps after the first")
    p.add_argument("--epochs", type=int, default=2, help="baseline: epochs for both paths")
    p.add_argument("--per-class", type=int, default=40, help="baseline: synthetic images per class without --data")
    p.add_argument("--timeout", type=float, default=300, help="sweep: seconds per architecture")
    a = p.parse_args()
    {"sweep": sweep, "baseline": baseline, "factors": factors, "_sweep_worker": sweep_worker,
     "_baseline_worker": baseline_worker}[a.mode](a)


if __name__ == "__main__":
    main()

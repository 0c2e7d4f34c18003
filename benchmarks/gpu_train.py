"""GPU training throughput: end-to-end training images/s next to the fixed-batch step rate, per
architecture, in one run (any Keras backend; JAX is what the device machine has).

    KERAS_BACKEND=jax python benchmarks/gpu_train.py [--archs efficientnetb0,resnet50,densenet121,vit_b16,unet]
        [--size 224] [--seg-size 256] [--batch 128] [--seg-batch 64] [--images 4096] [--out DIR]

For each architecture (random init, the registry's own builders, the device's default precision,
bfloat16 on Ampere and newer):
- **step rate**: the compiled training step (augmentation inside it, as in training) on one fixed
  uint8 batch, ``--steps`` steps after compilation;
- **end to end**: covidcxr's real input path: synthetic 256 px images decoded once into the input
  cache, then shuffled uint8 batches sliced from it by the loader while the accelerator trains,
  ``--epochs`` epochs after a warm-up epoch;
- the ratio (target: at least 0.90 for efficientnetb0 and resnet50 at 224 px and unet at 256 px).
Results go to stdout as a Markdown table and, with ``--out`` (default $OUT if set), to gpu_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEGMENTERS = ("unet",)


class FixedBatch:
    """A keras PyDataset of one batch repeated (the step rate without the input path)."""

    def __new__(cls, x, y, steps):
        import keras

        class _DS(keras.utils.PyDataset):
            def __len__(self):
                return steps

            def __getitem__(self, i):
                return x, y

        return _DS()


def _data(n: int, size: int, root: Path):
    from covidcxr.data.manifest import build_manifest
    from covidcxr.data.synth import write_synthetic_dataset

    src = write_synthetic_dataset(root / "syn", per_class=max(1, n // 4), size=256, seed=0, progress=False)
    df, _ = build_manifest(src, (1.0, 0.0, 0.0), progress=False)
    return df


def _trainee(arch: str, task_name: str, size: int, n_classes: int):
    from covidcxr.config import TrainConfig
    from covidcxr.augment import Augment
    from covidcxr.training.phases import Phase, make_optimizer
    from covidcxr.tasks import get_task
    from covidcxr.training.trainee import Trainee

    cfg, task = TrainConfig(arch=arch, task=task_name, image_size=size), get_task(task_name)
    net = task.build(arch, size, n_classes, None, cfg.dropout, cfg.bn_momentum)
    tr = Trainee(net, Augment(seed=0), task)
    tr.compile(optimizer=make_optimizer(Phase("scratch", 1, cfg.lr), 1, cfg.weight_decay), jit_compile=True,
               **task.compile_args(cfg))
    return tr, task


def _timed_fit(trainee, ds, epochs=1) -> float:
    t = time.perf_counter()
    logs = trainee.fit(ds, epochs=epochs, verbose=0, shuffle=False).history
    float(logs["loss"][-1])  # the values are on the host: every step has finished
    return time.perf_counter() - t


def measure(arch: str, size: int, batch: int, n_images: int, steps: int, epochs: int, root: Path) -> dict:
    import numpy as np

    from covidcxr.training.data import Batches, open_run_data

    task_name = "segment" if arch in SEGMENTERS else "classify"
    df = _data(n_images, size, root)
    classes = sorted(df["label"].unique())
    t = time.perf_counter()
    data = open_run_data(df, classes, size, "none", mask_column="lung_mask" if task_name == "segment" else None,
                         cache_dir=root / "cache", progress=False)
    cache_s = time.perf_counter() - t
    trainee, task = _trainee(arch, task_name, size, len(classes))
    loader = Batches(data, np.flatnonzero(data.cache.ok), batch, shuffle=True, seed=0)
    x, y = loader.batch(0)
    fixed = FixedBatch(x, y, steps)
    compile_s = _timed_fit(trainee, FixedBatch(x, y, 2))
    step_s = _timed_fit(trainee, fixed)
    loader.set_epoch(0)
    _timed_fit(trainee, loader)  # warm-up epoch (first pass over the memory map)
    e2e, n = 0.0, 0
    for e in range(1, epochs + 1):
        loader.set_epoch(e)
        e2e += _timed_fit(trainee, loader)
        n += len(loader) * batch
    loader.close()
    step_rate, e2e_rate = steps * batch / step_s, n / e2e
    return {"arch": arch, "task": task_name, "size": size, "batch": batch, "images": len(df),
            "cache_build_s": round(cache_s, 1), "compile_s": round(compile_s, 1),
            "step_images_per_s": round(step_rate, 1), "end_to_end_images_per_s": round(e2e_rate, 1),
            "ratio": round(e2e_rate / step_rate, 3)}


def _device() -> str:
    import keras

    from covidcxr.training import devices as D

    dev = D.detect()
    policy = D.precision_policy(dev, None)
    keras.mixed_precision.set_global_policy(policy)
    return f"{dev.describe()}, {policy}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="efficientnetb0,resnet50,densenet121,vit_b16,unet")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seg-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seg-batch", type=int, default=64)
    p.add_argument("--images", type=int, default=4096, help="synthetic images (the end-to-end epoch)")
    p.add_argument("--steps", type=int, default=30, help="fixed-batch steps timed")
    p.add_argument("--epochs", type=int, default=2, help="end-to-end epochs timed (after one warm-up epoch)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_train.json")
    a = p.parse_args()
    device = _device()
    print(f"device: {device}; {os.cpu_count()} CPU cores", flush=True)
    print("| arch | px | batch | fixed-batch step img/s | end-to-end img/s | ratio | compile s | cache build s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for arch in a.archs.split(","):
        seg = arch in SEGMENTERS
        size, batch = (a.seg_size, a.seg_batch) if seg else (a.size, a.batch)
        try:
            r = measure(arch, size, batch, a.images, a.steps, a.epochs, Path(tempfile.mkdtemp()))
        except Exception as exc:  # report and go on: one architecture must not cost the others
            r = {"arch": arch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"| {arch} | {size} | {batch} | failed: {r['error']} | | | | |", flush=True)
        else:
            print(f"| {arch} | {size} | {batch} | {r['step_images_per_s']} | {r['end_to_end_images_per_s']} | "
                  f"{r['ratio']:.2f} | {r['compile_s']} | {r['cache_build_s']} |", flush=True)
        results.append({**r, "device": device})
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            Path(a.out, "gpu_train.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

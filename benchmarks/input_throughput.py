"""Input path alone (no model): can the host feed an accelerator?

    python benchmarks/input_throughput.py [--data DIR | --synthetic N] [--size 224] [--batch 128] [--epochs 3]

Prints, in one run:
- the previous tf.data path (benchmarks/tfdata_baseline.py): epoch 1 (read, decode, resize, cache)
  and the cached epochs after it (shuffle, CPU augmentation, normalisation to float RGB);
- covidcxr's cache build (decode once in worker processes into memory-mapped uint8), its
  ratio to the old first epoch, and the cached, shuffled uint8 batches a training epoch
  slices from it (augmentation runs on the accelerator, inside the training step);
- peak RSS of this process.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tfdata_epochs(paths, labels, k, size, batch, epochs) -> list[float]:
    from benchmarks.tfdata_baseline import dataset

    ds = dataset(paths, labels, k, size, batch, "torch")
    rates = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for x, _ in ds:
            n += int(x.shape[0])
        rates.append(n / (time.perf_counter() - t))
    return rates


def cached_epochs(df, classes, size, batch, epochs, cache_dir, workers) -> tuple[float, list[float]]:
    import numpy as np

    from covidcxr.training.data import Batches, open_run_data

    t = time.perf_counter()
    data = open_run_data(df, classes, size, "none", cache_dir=cache_dir, workers=workers, progress=False)
    build = len(df) / (time.perf_counter() - t)
    loader = Batches(data, np.flatnonzero(data.cache.ok), batch, shuffle=True, seed=0)
    rates = []
    for e in range(epochs):
        t = time.perf_counter()
        loader.set_epoch(e)
        n = sum(int(loader[i][0]["image"].shape[0]) for i in range(len(loader)))
        rates.append(n / (time.perf_counter() - t))
    loader.close()
    return build, rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset folder (default: --synthetic generated images)")
    p.add_argument("--synthetic", type=int, default=2000, help="generated 256 px images when --data is not given")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="cache-building processes (default: CPU count)")
    a = p.parse_args()
    import numpy as np

    from covidcxr.data.manifest import build_manifest
    from covidcxr.data.synth import write_synthetic_dataset

    tmp = Path(tempfile.mkdtemp())
    data = Path(a.data) if a.data else write_synthetic_dataset(tmp / "syn", per_class=a.synthetic // 4, size=256,
                                                               seed=0, progress=False)
    df, _ = build_manifest(data, (1.0, 0.0, 0.0), progress=False)
    classes = sorted(df["label"].unique())
    labels = np.array([classes.index(c) for c in df["label"]])
    old = tfdata_epochs(df["path"].tolist(), labels, len(classes), a.size, a.batch, a.epochs)
    rss_old = rss_mb()
    build, new = cached_epochs(df, classes, a.size, a.batch, a.epochs, tmp / "cache", a.workers)
    print(f"data: {data} ({len(df)} images), {a.size} px, batch {a.batch}, {os.cpu_count()} CPU cores")
    print("previous tf.data path, images/s per epoch (1 = decode + cache): "
          + ", ".join(f"{v:.0f}" for v in old))
    print(f"covidcxr cache build: {build:.0f} images/s = {build / old[0]:.2f}x the old first epoch")
    print("covidcxr cached, shuffled uint8 batches, images/s per epoch: " + ", ".join(f"{v:.0f}" for v in new)
          + f" ({new[-1] / old[-1]:.1f}x the old cached epoch, which also augments on the CPU)")
    print(f"peak RSS {rss_mb():.0f} MB (after the tf.data path: {rss_old:.0f} MB)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

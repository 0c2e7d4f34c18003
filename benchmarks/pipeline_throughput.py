"""Input-pipeline throughput: covidcxr's tf.data pipeline against a plain
keras.utils.image_dataset_from_directory pipeline, same images, same run.

    python benchmarks/pipeline_throughput.py [--data DIR] [--synthetic N] [--size 224] [--epochs 3]

Prints images/s per epoch (epoch 1 = decode + cache fill, later epochs = cached)
and peak RSS. Both pipelines decode, resize to --size, augment and batch 32.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_epochs(ds, epochs):
    out = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for batch in ds:
            n += int(batch[0].shape[0])
        out.append(n / (time.perf_counter() - t))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None)
    p.add_argument("--synthetic", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    import keras
    import tensorflow as tf

    from covidcxr.data.manifest import build_manifest
    from covidcxr.data.pipeline import AugmentConfig, make_dataset
    from covidcxr.data.synth import write_synthetic_dataset

    data = Path(a.data) if a.data else write_synthetic_dataset(
        Path(tempfile.mkdtemp()) / "syn", per_class=a.synthetic // 4, size=256, seed=0, progress=False)
    df, rep = build_manifest(data, (1.0, 0.0, 0.0), progress=False)
    classes = sorted(df["label"].unique())
    ours = make_dataset(df, classes, image_size=a.size, normalization="torch", batch_size=32, training=True,
                        augment=AugmentConfig())
    ours_ips = time_epochs(ours, a.epochs)
    rss_ours = rss_mb()
    # Plain Keras baseline: its own loader over the same class folders, cached, same augmentation family.
    roots = sorted({str(Path(pth).parent.parent) for pth in df["path"]})
    common = Path(roots[0]).parent if rep.layout == "kaggle" else Path(rep.root)
    img_dir = "images" if rep.layout == "kaggle" else None
    if img_dir:  # image_dataset_from_directory wants <class>/<files>: link the images/ folders
        link = Path(tempfile.mkdtemp())
        for c in classes:
            (link / c).symlink_to(common / c / "images")
        common = link
    base = keras.utils.image_dataset_from_directory(common, image_size=(a.size, a.size), batch_size=32,
                                                    color_mode="rgb", label_mode="categorical", seed=0)
    aug = keras.Sequential([keras.layers.RandomRotation(0.02), keras.layers.RandomZoom(0.1),
                            keras.layers.RandomTranslation(0.05, 0.05), keras.layers.RandomContrast(0.15)])
    base = base.cache().map(lambda x, y: (aug(x, training=True) / 255.0, y),
                            num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    base_ips = time_epochs(base, a.epochs)
    print(f"data: {data} ({len(df)} images), size {a.size}, batch 32, {a.epochs} epochs")
    print("covidcxr pipeline images/s per epoch: " + ", ".join(f"{v:.0f}" for v in ours_ips))
    print("image_dataset_from_directory images/s per epoch: " + ", ".join(f"{v:.0f}" for v in base_ips))
    print(f"cached speed-up (last epoch): {ours_ips[-1] / base_ips[-1]:.2f}x; peak RSS {rss_mb():.0f} MB "
          f"(after ours: {rss_ours:.0f} MB)")


if __name__ == "__main__":
    main()

"""Host and serving-graph preprocessing speed: the exact integer path against the previous float path.

    python benchmarks/preprocess_exact.py [--files N] [--sizes 224,512]

Host: decode (``read_image``) and ``prepare`` (resize + contrast + uint8) on real films of
../shared/data, images/s, against the previous float implementation (Pillow's float BILINEAR
resize, float contrast) kept here as the baseline. Graph: the SavedModel's preprocessing
(``tfgraph.prepare_bytes`` in a tf.function, batch of encoded bytes) against the previous
``tf.image.resize(antialias=True)`` graph. Also a 2500 x 2048 film (full-resolution CXR size),
and whether each pair gives identical pixels. Prints one line per measurement.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import read_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def old_prepare(img01: np.ndarray, size: int) -> np.ndarray:
    """The previous host path for --contrast none: Pillow float resize, round half to even."""
    img = Image.fromarray(np.ascontiguousarray(img01, np.float32), mode="F")
    out = np.clip(np.asarray(img.resize((size, size), Image.BILINEAR), np.float32), 0, 1)
    return np.round(out * np.float32(255)).astype(np.uint8)


def rate(fn, items, repeat=1) -> float:
    fn(items[0])
    t = time.perf_counter()
    for _ in range(repeat):
        for it in items:
            fn(it)
    return repeat * len(items) / (time.perf_counter() - t)


def host(files, sizes):
    t = time.perf_counter()
    grays = [read_image(f) for f in files]
    print(f"host decode (read_image, 16-bit grid): {len(files) / (time.perf_counter() - t):.0f} images/s")
    for size in sizes:
        new = rate(lambda g: P.prepare(g, size), grays)
        old = rate(lambda g: old_prepare(g, size), grays)
        clahe = rate(lambda g: P.prepare(g, size, "clahe"), grays)
        print(f"host prepare {size} px: exact {new:.0f} images/s, previous float {old:.0f} images/s (ratio "
              f"{new / old:.2f}); exact with --contrast clahe {clahe:.0f} images/s")
    big = (np.random.default_rng(0).integers(0, 65536, (2500, 2048)) / 65535).astype(np.float32)
    new, old = rate(lambda g: P.prepare(g, 224), [big], 5), rate(lambda g: old_prepare(g, 224), [big], 5)
    print(f"host prepare 2500x2048 -> 224: exact {1000 / new:.1f} ms, previous {1000 / old:.1f} ms")


def graph(files, sizes):
    import tensorflow as tf

    from covidcxr.data import tfgraph as G

    data = tf.constant([Path(f).read_bytes() for f in files])
    for size in sizes:
        def old_one(b):
            img = tf.image.resize(G.decode_bytes(b), (size, size), method="bilinear", antialias=True)
            return tf.cast(tf.round(tf.clip_by_value(img, 0, 1) * 255), tf.uint8)

        fns = {"exact": lambda b: G.prepare_bytes(b, size, "none"), "previous tf.image.resize": old_one}
        rates, pixels = {}, {}
        for name, one in fns.items():
            f = tf.function(lambda d, one=one: tf.map_fn(one, d, fn_output_signature=tf.TensorSpec([size, size, 1],
                                                                                                    tf.uint8)))
            pixels[name] = f(data).numpy()[..., 0]
            t = time.perf_counter()
            f(data)
            rates[name] = len(files) / (time.perf_counter() - t)
        host_px = np.stack([P.prepare(read_image(f), size) for f in files])
        same = {k: int((v != host_px).sum()) for k, v in pixels.items()}
        print(f"graph prepare {size} px: " + ", ".join(f"{k} {r:.0f} images/s ({same[k]} pixels differ from the host)"
                                                      for k, r in rates.items()))


CACHE_CHILD = """
import sys, time, tempfile
from covidcxr.data.manifest import build_manifest
from covidcxr.training.data import open_run_data
df, _ = build_manifest(sys.argv[1], (1.0, 0.0, 0.0), progress=False)
t = time.perf_counter()
open_run_data(df, sorted(df["label"].unique()), 224, "none", cache_dir=tempfile.mkdtemp(), progress=False)
print(len(df) / (time.perf_counter() - t))
"""


def cache_build(data: str, baseline: str | None, repeats: int = 2) -> None:
    """The whole host input path (decode, hashes, thumbnail, resize, uint8; worker processes), as
    the input cache builds it at 224 px, for this tree and a baseline tree, alternately."""
    import os
    import subprocess
    import sys

    trees = {"this tree": str(Path(__file__).resolve().parents[1])}
    if baseline:
        trees["baseline"] = baseline
    rates = {k: [] for k in trees}
    for _ in range(repeats):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run([sys.executable, "-c", CACHE_CHILD, data], env=env, capture_output=True, text=True,
                                 check=True)
            rates[name].append(float(out.stdout.split()[-1]))
    print(f"cache build at 224 px on {data}: " + ", ".join(f"{k} {max(v):.0f} images/s (best of {len(v)})"
                                                            for k, v in rates.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--cache-data", default=str(SHARED / "covid-qu-ex-train"), help="dataset for the cache-build timing")
    ap.add_argument("--baseline-tree", default=None, help="a checkout of the previous code (its covidcxr/ is imported)")
    a = ap.parse_args()
    files = sorted(str(p) for p in SHARED.rglob("images/*.png"))
    files = files[:: max(1, len(files) // a.files)][: a.files]
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"{len(files)} real films from {SHARED}")
    host(files, sizes)
    if not a.no_graph:
        graph(files, sizes)
    cache_build(a.cache_data, a.baseline_tree)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

"""Self-supervised pretraining on unlabelled X-rays: ``python -m covidcxr.pretrain --method simclr --arch resnet50 --data DIR``.

SimCLR (Chen et al. 2020): two random views of each image, an encoder from the registry,
global pooling and a 2-layer projection head, and the NT-Xent contrastive loss (each view
must pick its partner out of the 2B-1 other views of the batch). Views use augmentations
that make sense for grayscale chest X-rays: random resized crops (35-100% of the area),
small rotations, brightness/contrast, Gaussian blur; no colour jitter and no flips.

Labels are ignored: DIR is any folder of images (searched recursively) or a manifest CSV (by default
only its training rows, so validation and test images stay unseen: ``--split``).
Writes ``OUT`` (encoder weights, ``.weights.h5``) and ``OUT.json`` (arch, image size, method,
loss per epoch), which ``python -m covidcxr.train --arch ARCH --weights OUT`` accepts; a
weights file from another architecture is refused with the two names.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from covidcxr.errors import ConfigError, CovidCXRError, DataError, RunExistsError


def nt_xent(temperature: float = 0.1):
    """Loss on projections z [2B, d] ordered (view 1 of the batch, view 2 of the batch)."""
    import keras
    from keras import ops

    def loss(y_true, z):
        z = ops.cast(z, "float32")
        z = z / ops.maximum(ops.norm(z, axis=-1, keepdims=True), 1e-12)
        n = ops.shape(z)[0]
        b = n // 2
        sim = ops.matmul(z, ops.transpose(z)) / temperature
        sim = sim - 1e9 * ops.eye(n)  # a view is not its own partner
        partner = ops.concatenate([ops.arange(b, n), ops.arange(0, b)])
        ce = keras.losses.sparse_categorical_crossentropy(partner, sim, from_logits=True)
        return ops.mean(ce) + 0.0 * ops.sum(ops.cast(y_true, "float32"))

    return loss


def blur(images, sigma):
    """Per-image Gaussian blur of [B, S, S, 1] with per-image sigma [B] (separable, 7 taps)."""
    import tensorflow as tf

    x = tf.range(-3, 4, dtype=tf.float32)
    k = tf.exp(-(x[None, :] ** 2) / (2.0 * tf.maximum(sigma[:, None], 1e-3) ** 2))
    k = k / tf.reduce_sum(k, axis=1, keepdims=True)  # [B, 7]

    def one(args):
        img, kk = args
        out = tf.nn.conv2d(img[None], tf.reshape(kk, [7, 1, 1, 1]), 1, "SAME")
        return tf.nn.conv2d(out, tf.reshape(kk, [1, 7, 1, 1]), 1, "SAME")[0]

    return tf.map_fn(one, (images, k), fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32))


def views(images, size: int, seed=None):
    """One random SimCLR view of each image in a [B, S, S, 1] float batch in [0, 1]."""
    import tensorflow as tf

    from covidcxr.data.pipeline import AugmentConfig, augment_batch

    b = tf.shape(images)[0]
    area = tf.random.uniform([b], 0.35, 1.0, seed=seed)
    ratio = tf.exp(tf.random.uniform([b], math.log(3 / 4), math.log(4 / 3), seed=seed))
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    y0 = tf.random.uniform([b], 0, 1, seed=seed) * (1.0 - h)
    x0 = tf.random.uniform([b], 0, 1, seed=seed) * (1.0 - w)
    boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
    crops = tf.image.crop_and_resize(images, boxes, tf.range(b), (size, size))
    crops, _ = augment_batch(crops, None, AugmentConfig(rotation_deg=10, zoom=0.0, shift=0.0, hflip=False,
                                                        brightness=0.2, contrast=0.3), seed)
    sigma = tf.where(tf.random.uniform([b], seed=seed) < 0.5, tf.random.uniform([b], 0.1, 1.5, seed=seed), 0.0)
    crops = blur(crops, sigma)
    return tf.ensure_shape(crops, [None, size, size, 1])


def build_simclr(arch: str, image_size: int, projection_dim: int = 128, hidden: int = 512):
    """(model mapping images to projections, its encoder)."""
    import keras

    from covidcxr.models.registry import build_backbone, get_spec

    spec = get_spec(arch)
    encoder = build_backbone(spec, image_size, None)
    encoder.name = "backbone"
    inp = keras.Input((image_size, image_size, 3), name="image")
    f = encoder(inp)
    pool = keras.layers.GlobalAveragePooling1D if len(f.shape) == 3 else keras.layers.GlobalAveragePooling2D
    x = pool(name="gap")(f)
    x = keras.layers.Dense(hidden, name="proj_1")(x)
    x = keras.layers.BatchNormalization(name="proj_bn")(x)
    x = keras.layers.ReLU(name="proj_relu")(x)
    z = keras.layers.Dense(projection_dim, dtype="float32", name="proj_2")(x)
    return keras.Model(inp, z, name=f"simclr_{arch}"), encoder


def recalibrate_batchnorm(model, batches, max_batches: int | None = None) -> int:
    """Set every BatchNormalization layer's moving mean and variance to their average over
    ``batches`` (precise BN, Wu & Johnson 2021). Returns the number of batches used.

    Fine-tuning and inference run the pretrained encoder with BatchNormalization in inference
    mode, on its moving statistics. After a short contrastive run these are mostly still their
    initial values (0 and 1: MobileNetV3 and EfficientNet keep 99.9% of the old value per step),
    so the encoder maps every X-ray to nearly the same features. Here each layer's statistics
    become the cumulative mean over the batches (momentum k/(k+1) at the k-th batch), taken on
    plain, unaugmented images, which is what the encoder sees downstream."""
    import keras

    from covidcxr.models.classifier import iter_layers

    bns = [l for l in iter_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    momenta = [l.momentum for l in bns]
    k = 0
    try:
        for x in batches:
            if max_batches is not None and k >= max_batches:
                break
            for layer in bns:
                layer.momentum = k / (k + 1)
            model(x, training=True)  # eager: each call reads the momentum set above
            k += 1
    finally:
        for layer, m in zip(bns, momenta):
            layer.momentum = m
    return k


def image_paths(data: str | Path, split: str = "train") -> list[str]:
    """Image files of ``data``. From a manifest with a ``split`` column only the rows of ``split``
    (comma-separated names, or ``all``) are used, so that validation and test images stay unseen."""
    from covidcxr.predict import collect_inputs

    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder.")
    if data.is_file() and data.suffix.lower() == ".csv":
        import pandas as pd

        df = pd.read_csv(data, dtype=str, keep_default_na=False)
        if "path" not in df.columns:
            raise DataError(f"--data {data}: a manifest needs a 'path' column (python -m covidcxr.data index).")
        if "split" in df.columns and split != "all":
            wanted = [s.strip() for s in split.split(",") if s.strip()]
            unknown = sorted(set(wanted) - set(df["split"]))
            if unknown:
                raise DataError(f"--split {split}: {data} has no rows in split(s) {unknown}; it has "
                                f"{sorted(set(df['split']))} (or pass --split all).")
            df = df[df["split"].isin(wanted)]
        if df.empty:
            raise DataError(f"--data {data}: no rows to pretrain on.")
        return df["path"].tolist()
    files, _ = collect_inputs([str(data)])
    # Masks are images too: leave out the mask folders of the known layouts.
    files = [f for f in files if not any(p.lower() in ("masks", "lung masks", "infection masks") for p in f.parts)]
    if not files:
        raise DataError(f"--data {data}: no image files found.")
    return [str(f) for f in files]


def pretrain(arch: str, data: str, out: str | Path, image_size: int = 224, epochs: int = 10, batch_size: int = 64,
             lr: float = 1e-3, temperature: float = 0.1, seed: int = 0, overwrite: bool = False,
             split: str = "train") -> Path:
    import keras
    import pandas as pd
    import tensorflow as tf

    from covidcxr.data import preprocess as P
    from covidcxr.data.pipeline import load_examples, make_dataset
    from covidcxr.models.registry import get_spec

    spec = get_spec(arch)
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConfigError(f"--out {out}: the encoder weights file must end in .weights.h5.")
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or another --out.")
    paths = image_paths(data, split)
    if len(paths) < 2:
        raise DataError(f"--data {data}: contrastive learning needs at least 2 images, found {len(paths)}.")
    batch_size = min(batch_size, len(paths))
    keras.utils.set_random_seed(seed)
    df = pd.DataFrame({"path": paths, "label": "x"})
    load = int(round(image_size * 1.15))  # a little larger than the views, for the crops
    ds = load_examples(df, ["x"], load).cache().shuffle(len(df), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=len(df) >= 2 * batch_size)

    def two_views(e):
        img = tf.cast(e["image"], tf.float32) / 255.0
        x = tf.concat([views(img, image_size), views(img, image_size)], axis=0)
        x = P.normalize(x, spec.normalization)
        return x, tf.zeros([tf.shape(x)[0]])

    ds = ds.map(two_views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    model, encoder = build_simclr(arch, image_size)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=1e-4), loss=nt_xent(temperature))
    print(f"SimCLR pretraining of {arch} on {len(paths)} unlabelled images at {image_size} px, batch {batch_size} "
          f"({2 * batch_size} views), {epochs} epochs, temperature {temperature}")
    t0 = time.perf_counter()
    hist = model.fit(ds, epochs=epochs, verbose=1 if sys.stdout.isatty() else 2)
    losses = [float(v) for v in hist.history["loss"]]
    if not all(np.isfinite(losses)):
        raise CovidCXRError(f"pretraining diverged (loss {losses}); lower --lr.")
    plain = make_dataset(df, ["x"], image_size=image_size, normalization=spec.normalization,
                         batch_size=batch_size, cache=None)
    n_bn = recalibrate_batchnorm(encoder, (x for x, _, _ in plain), max_batches=200)
    bn_note = (f"recomputed on {min(len(df), n_bn * batch_size)} unaugmented images" if n_bn
               else "none in this encoder")
    print(f"BatchNormalization statistics: {bn_note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".partial.weights.h5"))
    encoder.save_weights(tmp)
    tmp.replace(out)
    meta = {"arch": arch, "method": "simclr", "image_size": image_size, "epochs": epochs, "batch_size": batch_size,
            "temperature": temperature, "lr": lr, "images": len(paths), "data": str(data), "split": split,
            "loss": losses, "seconds": round(time.perf_counter() - t0, 1), "batchnorm": bn_note}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (chance level {math.log(2 * batch_size - 1):.4f}); "
          f"encoder weights: {out}\nfine-tune: python -m covidcxr.train --arch {arch} --weights {out} --data DIR")
    return out


def main(argv: list[str] | None = None) -> int:
    from covidcxr.models.registry import arch_names

    p = argparse.ArgumentParser(prog="python -m covidcxr.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr", choices=["simclr"])
    p.add_argument("--arch", default="resnet50", help=f"encoder: one of {', '.join(arch_names())}")
    p.add_argument("--data", required=True, help="folder of images (labels ignored) or manifest CSV")
    p.add_argument("--out", default=None, help="encoder weights file (default saved_models/simclr-<arch>.weights.h5)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (2x views)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train",
                   help="with a manifest CSV: the split(s) to pretrain on, comma-separated, or 'all' "
                        "(default train, so validation and test images stay unseen); ignored for a folder")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        from covidcxr.models.registry import check_image_size, get_spec

        check_image_size(get_spec(a.arch), a.image_size)
        if a.epochs < 1 or a.batch_size < 2 or a.temperature <= 0:
            raise ConfigError("--epochs must be >= 1, --batch-size >= 2 and --temperature > 0.")
        out = a.out or f"saved_models/simclr-{a.arch}.weights.h5"
        pretrain(a.arch, a.data, out, a.image_size, a.epochs, a.batch_size, a.lr, a.temperature, a.seed, a.overwrite,
                 a.split)
    except CovidCXRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

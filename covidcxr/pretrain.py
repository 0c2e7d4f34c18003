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

Runs on the TensorFlow, JAX and PyTorch backends: images come from the decoded-input cache
(``--cache-dir``) as uint8 batches, and the views are made in ``keras.ops`` inside the compiled
training step.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from covidcxr import cli

with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    import keras
    import numpy as np
    import pandas as pd
    from keras import ops
    from covidcxr.augment import affine_matrices, sample_affine
    from covidcxr.data.imageio import is_image_file
    from covidcxr.data.layouts import INFECTION_MASK_DIRS, LUNG_MASK_DIRS
    from covidcxr.errors import ConfigError, CovidCXRError, DataError, RunExistsError
    from covidcxr.models.classifier import iter_layers
    from covidcxr.models.layers import BackboneInput
    from covidcxr.models.registry import build_backbone, check_image_size, get_spec
    from covidcxr.training import devices as D
    from covidcxr.training.data import Batches, open_run_data

LOAD_SCALE = 1.15     # images are cached this much larger than the views, so crops keep detail
BLUR_RADIUS = 4       # Gaussian taps each side: 2.7 sigma at the largest sigma
VIEW = dict(min_area=0.35, max_ratio=4 / 3, rotation_deg=10.0, brightness=0.2, contrast=0.3,
            blur_p=0.5, sigma=(0.1, 1.5))
N_PARAMS = 9          # uniform numbers drawn per view (see render_views)


def nt_xent(temperature: float = 0.1):
    """Loss on projections z [2B, d] ordered (view 1 of the batch, view 2 of the batch)."""
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


def load_size(image_size: int) -> int:
    """Side of the cached images for views of ``image_size`` pixels."""
    return int(round(image_size * LOAD_SCALE))


def blur(images, sigma, radius: int = BLUR_RADIUS):
    """Per-image Gaussian blur of float [B, S, S, 1] with per-image sigma [B] (pixels; 0: none).

    Separable, and written as a per-image weighted sum of 2*radius+1 shifted copies of the
    (mirror-padded) image, so each image gets its own kernel with plain elementwise ops: any
    backend, any batch size, nothing but the batch dimension dynamic."""
    size = images.shape[1]
    taps = ops.cast(ops.arange(-radius, radius + 1), "float32")
    s = ops.maximum(ops.cast(sigma, "float32"), 1e-3)[:, None]
    k = ops.exp(-ops.square(taps)[None, :] / (2.0 * ops.square(s)))
    k = k / ops.sum(k, axis=1, keepdims=True)                        # [B, 2r+1]; sigma 0: a delta
    x = ops.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="symmetric")
    rows = sum(x[:, :, t:t + size, :] * ops.reshape(k[:, t], (-1, 1, 1, 1)) for t in range(2 * radius + 1))
    return sum(rows[:, t:t + size, :, :] * ops.reshape(k[:, t], (-1, 1, 1, 1)) for t in range(2 * radius + 1))


def crop_matrices(u, load: int, size: int, rotation_deg: float, min_area: float, max_ratio: float):
    """Affine maps [B, 6] (see ``affine_matrices``) from the pixels of a ``size`` view to those of a
    ``load`` image: a random box of ``min_area``..100% of the area, aspect 1/max_ratio..max_ratio,
    rotated by up to ``rotation_deg`` about its centre. ``u``: uniform [B, >=5] in [0, 1)."""
    area = min_area + (1.0 - min_area) * u[:, 0]
    ratio = ops.exp((2.0 * u[:, 1] - 1.0) * math.log(max_ratio))
    w = ops.minimum(ops.sqrt(area * ratio), 1.0)                   # box sides as fractions of the image
    h = ops.minimum(ops.sqrt(area / ratio), 1.0)
    cx = (u[:, 2] * (1.0 - w) + w / 2.0) * load - 0.5              # box centre in input pixels
    cy = (u[:, 3] * (1.0 - h) + h / 2.0) * load - 0.5
    angle = (2.0 * u[:, 4] - 1.0) * (rotation_deg * math.pi / 180.0)
    ctr = (size - 1.0) / 2.0
    return affine_matrices(size, angle, size / (w * load), size / (h * load), cx - ctr, cy - ctr, ops.ones_like(w))


def render_views(images, size: int, u, cfg: dict = VIEW):
    """Views of ``size`` pixels of float [B, L, L, 1] 0..255 images, one per image, from the uniform
    numbers ``u`` [B, N_PARAMS]: crop + rotation in one bilinear resampling (outside the image: 0),
    then contrast about the view's mean, brightness, clipping to 0..255, and a Gaussian blur on
    ``blur_p`` of the views. ``sample_affine`` writes an L x L grid; the view is its top-left corner."""
    images = ops.cast(images, "float32")
    mats = crop_matrices(u, images.shape[1], size, cfg["rotation_deg"], cfg["min_area"], cfg["max_ratio"])
    x = sample_affine(images, mats)[:, :size, :size, :]
    mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
    k = ops.reshape(1.0 + (2.0 * u[:, 5] - 1.0) * cfg["contrast"], (-1, 1, 1, 1))
    shift = ops.reshape((2.0 * u[:, 6] - 1.0) * cfg["brightness"] * 255.0, (-1, 1, 1, 1))
    x = ops.clip((x - mean) * k + mean + shift, 0.0, 255.0)
    lo, hi = cfg["sigma"]
    sigma = ops.where(u[:, 7] < cfg["blur_p"], lo + (hi - lo) * u[:, 8], 0.0)
    return blur(x, sigma)


def plain_views(images, size: int):
    """The whole image resampled to ``size`` pixels, unaugmented (what fine-tuning will see)."""
    # area 1, aspect 1, no rotation, contrast x1, brightness +0, no blur (see render_views)
    u = ops.convert_to_tensor([[1.0, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 0.0]], "float32")
    u = u + ops.zeros((ops.shape(images)[0], 1))
    return render_views(images, size, u, {**VIEW, "blur_p": 0.0})


@functools.cache
def simclr_class():
    """The SimCLR ``keras.Model`` subclass (defined on first use: Keras is imported late, after the CLI
    has silenced the backend's start-up noise)."""
    class SimCLR(keras.Model):
        """uint8-range images [B, L, L, 1] (or a batch dict with "image") -> projections. Training:
        two random views per image, z [2B, d] ordered (views 1, views 2); else the plain view, z [B, d]."""

        def __init__(self, encoder, normalization, image_size: int, projection_dim=128, hidden=512, seed=None, **kw):
            super().__init__(**kw)
            self.encoder, self.image_size = encoder, image_size
            self.backbone_input = BackboneInput(normalization)
            self.proj_1 = keras.layers.Dense(hidden, name="proj_1")
            self.proj_bn = keras.layers.BatchNormalization(name="proj_bn")
            self.proj_2 = keras.layers.Dense(projection_dim, dtype="float32", name="proj_2")
            self.seed_generator = keras.random.SeedGenerator(seed)

        def views(self, images):
            """Two random views of every image, [2B, S, S, 1]."""
            images = ops.cast(images, "float32")
            two = ops.concatenate([images, images], axis=0)
            u = keras.random.uniform((ops.shape(two)[0], N_PARAMS), 0.0, 1.0, seed=self.seed_generator)
            return render_views(two, self.image_size, u)

        def call(self, inputs, training=False):
            images = inputs["image"] if isinstance(inputs, dict) else inputs
            x = self.views(images) if training else plain_views(ops.cast(images, "float32"), self.image_size)
            f = self.encoder(self.backbone_input(x), training=training)
            f = ops.mean(f, axis=tuple(range(1, len(f.shape) - 1)))  # global average pool, maps or tokens
            x = ops.relu(self.proj_bn(self.proj_1(f), training=training))
            return self.proj_2(x)

    return SimCLR


def build_simclr(arch: str, image_size: int, projection_dim: int = 128, hidden: int = 512, seed=None):
    """(SimCLR model mapping uint8-range images to projections, its bare registry encoder)."""
    spec = get_spec(arch)
    encoder = build_backbone(spec, image_size, None)
    return simclr_class()(encoder, spec.normalization, image_size, projection_dim, hidden, seed,
                           name=f"simclr_{arch}"), encoder


def recalibrate_batchnorm(model, batches, max_batches: int | None = None) -> int:
    """Set every BatchNormalization layer's moving mean and variance to their average over
    ``batches`` (precise BN, Wu & Johnson 2021). Returns the number of batches used.

    Fine-tuning and inference run the pretrained encoder with BatchNormalization in inference
    mode, on its moving statistics. After a short contrastive run these are mostly still their
    initial values (0 and 1: MobileNetV3 and EfficientNet keep 99.9% of the old value per step),
    so the encoder maps every X-ray to nearly the same features. Here each layer's statistics
    become the cumulative mean over the batches (momentum k/(k+1) at the k-th batch), taken on
    plain, unaugmented images, which is what the encoder sees downstream."""
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


def _manifest_paths(data: Path, split: str) -> list[str]:
    try:
        df = pd.read_csv(data, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"--data {data}: not a readable CSV manifest ({exc}).") from exc
    if "path" not in df.columns:
        raise DataError(f"--data {data}: a manifest needs a 'path' column (python -m covidcxr.data index).")
    if "split" in df.columns and split != "all":
        wanted = [s.strip() for s in split.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(df["split"]))
        if unknown:
            raise DataError(f"--split {split}: {data} has no rows in split(s) {unknown}; it has "
                            f"{sorted(set(df['split']))} (or pass --split all).")
        df = df[df["split"].isin(wanted)]
    base = data.resolve().parent  # relative paths are relative to the manifest, as covidcxr.data writes them
    return [p if os.path.isabs(p) else str(base / p) for p in df["path"] if p]


def image_paths(data: str | Path, split: str = "train") -> list[str]:
    """Image files of ``data``. From a manifest with a ``split`` column only the rows of ``split``
    (comma-separated names, or ``all``) are used, so that validation and test images stay unseen.
    A folder is searched recursively; the mask folders of the known layouts are left out (masks
    are images too)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder.")
    if data.is_file() and data.suffix.lower() == ".csv":
        paths = _manifest_paths(data, split)
        if not paths:
            raise DataError(f"--data {data}: no rows to pretrain on.")
        return paths
    if data.is_file():
        return [str(data)]
    masks = {d.lower() for d in LUNG_MASK_DIRS + INFECTION_MASK_DIRS}
    files = [f for f in sorted(data.rglob("*")) if f.is_file() and is_image_file(f)
             and not any(p.lower() in masks for p in f.relative_to(data).parts[:-1])]
    if not files:
        raise DataError(f"--data {data}: no image files found.")
    return [str(f) for f in files]


def _open_images(paths: list[str], image_size: int, cache_dir, workers):
    """(RunData of the decoded images at the load size, usable cache rows); unreadable files are
    reported and left out."""
    df = pd.DataFrame({"path": paths, "label": "x", "split": "train"})
    data = open_run_data(df, ["x"], load_size(image_size), "none", cache_dir=cache_dir, workers=workers,
                         progress=sys.stderr.isatty())
    c = data.cache
    print(f"input cache: {c.path} ({'built in %.1f s' % c.built_seconds if c.built_seconds else 'reused'}, "
          f"{int(c.ok.sum())} of {len(c.ok)} images)")
    if data.skipped:
        print(f"left out {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0][1]}", file=sys.stderr)
    rows = data.rows("train")
    if len(rows) < 2:
        raise DataError(f"contrastive learning needs at least 2 images, found {len(rows)} readable ones.")
    return data, rows


def _fit(model, batches, epochs: int) -> list[float]:
    """One ``fit`` per epoch with the batch order fixed beforehand (``set_epoch``), as the
    training loop does: the same seed gives the same batches and views on every backend."""
    losses = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        batches.set_epoch(epoch)
        hist = model.fit(batches, epochs=1, verbose=1 if sys.stdout.isatty() else 0, shuffle=False)
        losses.append(float(hist.history["loss"][-1]))
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not np.isfinite(losses[-1]):
            raise CovidCXRError(f"pretraining diverged (loss {losses}); lower --lr.")
    return losses


def _recalibrate(model, data, rows, batch_size: int) -> str:
    """Precise BN statistics of the encoder on plain views of the training images."""
    plain = Batches(data, rows, batch_size, prefetch=0)
    feed = (model.backbone_input(plain_views(plain[i][0]["image"][:plain.valid(i)], model.image_size))
            for i in range(len(plain)))
    n_bn = recalibrate_batchnorm(model.encoder, feed, max_batches=200)
    return f"recomputed on {min(len(rows), n_bn * batch_size)} unaugmented images" if n_bn else "none in this encoder"


def pretrain(arch: str, data: str, out: str | Path, image_size: int = 224, epochs: int = 10, batch_size: int = 64,
             lr: float = 1e-3, temperature: float = 0.1, seed: int = 0, overwrite: bool = False,
             split: str = "train", cache_dir=None, workers=None) -> Path:
    """Pretrain ``arch`` with SimCLR on the images of ``data``; write ``out`` and ``out.json``."""
    get_spec(arch)
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConfigError(f"--out {out}: the encoder weights file must end in .weights.h5.")
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or another --out.")
    images, rows = _open_images(image_paths(data, split), image_size, cache_dir, workers)
    batch_size = min(batch_size, len(rows))
    device = D.detect()
    policy = D.precision_policy(device, None)
    keras.mixed_precision.set_global_policy(policy)
    D.make_deterministic(seed, device)
    model, encoder = build_simclr(arch, image_size, seed=seed)
    batches = Batches(images, rows, batch_size, shuffle=True, seed=seed)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=1e-4), loss=nt_xent(temperature),
                  jit_compile=device.backend == "jax" or D.use_jit(device, None))
    print(f"SimCLR pretraining of {arch} on {len(rows)} unlabelled images at {image_size} px, batch {batch_size} "
          f"({2 * batch_size} views), {epochs} epochs, temperature {temperature}; {device.describe()}, {policy}")
    t0 = time.perf_counter()
    try:
        losses = _fit(model, batches, epochs)
    finally:
        batches.close()
    bn_note = _recalibrate(model, images, rows, batch_size)
    print(f"BatchNormalization statistics: {bn_note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".partial.weights.h5"))
    encoder.save_weights(tmp)
    tmp.replace(out)
    meta = {"arch": arch, "method": "simclr", "image_size": image_size, "epochs": epochs, "batch_size": batch_size,
            "temperature": temperature, "lr": lr, "images": len(rows), "data": str(data), "split": split,
            "loss": losses, "seconds": round(time.perf_counter() - t0, 1), "batchnorm": bn_note}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (chance level {math.log(2 * batch_size - 1):.4f}); "
          f"encoder weights: {out}\nfine-tune: "
          + shlex.join(["python", "-m", "covidcxr.train", "--arch", arch, "--weights", str(out), "--data", "DIR"]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simclr", choices=["simclr"])
    p.add_argument("--arch", default="resnet50", help="encoder: a registry name (covidcxr.models.registry)")
    p.add_argument("--data", required=True, help="folder of images (labels ignored) or manifest CSV")
    p.add_argument("--out", default=None, help="encoder weights file (default saved_models/simclr-<arch>.weights.h5)")
    p.add_argument("--image-size", type=int, default=224, help="side of the views in pixels")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (2x views)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train",
                   help="with a manifest CSV: the split(s) to pretrain on, comma-separated, or 'all' "
                        "(default train, so validation and test images stay unseen); ignored for a folder")
    p.add_argument("--cache-dir", default=None, help="folder for the decoded-input cache (default: $COVIDCXR_CACHE "
                                                     "or ~/.cache/covidcxr)")
    p.add_argument("--workers", type=int, default=None, help="processes that build the input cache (default: CPUs)")
    p.add_argument("--overwrite", action="store_true")
    return p


def run(args) -> int:
    check_image_size(get_spec(args.arch), args.image_size)
    workers_ok = args.workers is None or args.workers >= 1
    if args.epochs < 1 or args.batch_size < 2 or args.temperature <= 0 or args.lr <= 0 or not workers_ok:
        raise ConfigError("--epochs must be >= 1, --batch-size >= 2, --temperature > 0, --lr > 0 and --workers >= 1.")
    out = args.out or f"saved_models/simclr-{args.arch}.weights.h5"
    pretrain(args.arch, args.data, out, args.image_size, args.epochs, args.batch_size, args.lr, args.temperature,
             args.seed, args.overwrite, args.split, args.cache_dir, args.workers)
    return 0


main = cli.entry(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())

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

from covidcxr import cli

with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    from covidcxr.errors import ConfigError
    from covidcxr.models.registry import check_image_size, get_spec
    from covidcxr.training.pretraining import pretrain


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

"""Train a CXR model: ``python -m covidcxr.train --arch resnet50`` (also ``--task segment|multitask``).

Runs on the TensorFlow, JAX and PyTorch backends (``KERAS_BACKEND=jax python -m covidcxr.train ...``).
Without ``--data`` it trains on the built-in synthetic demo set. Each run gets its own
directory (config.json, manifest.csv, model_card.json, history.csv, best.keras, curves.png,
metrics.json, TensorBoard logs) and an export under saved_models/.
"""
from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import replace
from pathlib import Path

from covidcxr import cli
with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    from covidcxr import artifacts as A
    from covidcxr.config import AugmentConfig, TrainConfig
    from covidcxr.errors import ConfigError, DataError
    from covidcxr.lungcrop import check_segmenter
    from covidcxr.models import catalog
    from covidcxr.models.weights import PRESET
    from covidcxr.training.rows import DEMO
    from covidcxr.tasks import get_task
    from covidcxr.training import multihost
    from covidcxr.training.run import train
    import keras

# --resume applies these (a longer budget; where outputs go; how this machine runs it); any other changed flag is refused
RESUMABLE = {"epochs", "fine_tune_epochs", "export_dir", "cache_dir", "workers", "mixed_precision", "jit_compile",
             "keep_resume_state"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default=None, help="dataset folder (Kaggle, COVID-QU-Ex or folder-per-class) or manifest CSV; "
                                  "omitted: the synthetic demo set")
    a("--arch", default="resnet50", help=catalog.arch_help())
    a("--task", default="classify", choices=["classify", "segment", "multitask"])
    a("--target", default="lung", choices=["lung", "infection"], help="segment/multitask: which masks to learn")
    a("--seg-loss", default="bce_dice", choices=["bce_dice", "dice", "focal"], help="segment/multitask mask loss")
    a("--loss-weights", default="label=1,mask=1", help="multitask: weights of the label and mask losses")
    a("--weights", default="auto", help="imagenet | none | PATH (local weights file or keras-hub preset folder) | "
                                        "MODEL (a covidcxr run or export folder, or hf://OWNER/NAME of an export: "
                                        "start from its weights) | auto (imagenet if obtainable, else none, with a "
                                        "warning)")
    a("--preset", default=None, help="keras-hub archs: a preset name (downloaded) or a local preset folder")
    a("--freeze-encoder", action="store_true", help="train the head only, encoder frozen throughout (linear probe)")
    a("--label-fraction", type=float, default=1.0, help="train on a stratified, seeded fraction of the train split")
    a("--image-size", type=int, default=None, help="input side in pixels (default 224; demo 128)")
    a("--batch-size", type=int, default=None, help="global batch size (default 32)")
    a("--epochs", type=int, default=None, help="phase-1 epochs: head only on a frozen backbone (default 10; demo 4)")
    a("--fine-tune-epochs", type=int, default=None, help="phase-2 epochs at lr/10 (default 10; demo 4)")
    a("--unfreeze", default="all", help="phase 2 unfreezes the top N backbone layers, or 'all' (BN stays frozen)")
    a("--lr", type=float, default=5e-4, help="phase-1 learning rate (AdamW); phase 2 uses lr/10")
    a("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    a("--label-smoothing", type=float, default=0.1)
    a("--dropout", type=float, default=0.3, help="head dropout")
    a("--warmup-epochs", type=float, default=1.0, help="linear LR warm-up (phase 1 / from scratch)")
    a("--bn-momentum", type=float, default=0.9, help="BatchNormalization momentum when training from scratch")
    a("--no-class-weights", action="store_true", help="do not weight classes by inverse frequency")
    a("--contrast", default="none", choices=["none", "stretch", "clahe", "gamma"], help="contrast enhancement")
    a("--hflip", action="store_true", help="random horizontal flips (off by default: flips the heart)")
    a("--no-augment", action="store_true", help="no augmentation")
    a("--lung-crop", nargs="?", const="given", default="", metavar="given|SEGMENTER",
      help="classify lung-cropped images: 'given' uses each image's own lung mask (every image needs one); "
           "SEGMENTER (a --task segment --target lung run or export) predicts the masks")
    a("--split", default="0.7,0.15,0.15", help="train,val[,test] fractions when the data has no split")
    a("--seed", type=int, default=42, help="seed for splits, shuffling, augmentation and initialisation")
    a("--monitor", default="auto", choices=["auto", "val_macro_f1", "val_macro_auc", "val_dice"],
      help="checkpoint selection metric (auto: val_dice for segment, val_macro_f1 otherwise)")
    a("--patience", type=int, default=8, help="early-stopping patience (epochs)")
    a("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
      help="bfloat16 (or float16 on older GPUs) compute; default: on for a GPU/TPU, off on a CPU")
    a("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
      help="XLA-compile the training step (TensorFlow; JAX always compiles); default: on for a GPU/TPU")
    a("--cache-dir", default=None, help="folder for the decoded-input cache (default: $COVIDCXR_CACHE or "
                                        "~/.cache/covidcxr); reused across runs, rebuilt when data or settings change")
    a("--workers", type=int, default=None, help="processes that build the input cache (default: CPU count)")
    a("--run-dir", default=None, help="run directory (default experiments/runs/<arch>-<task>-<time>)")
    a("--export-dir", default=None, help="export directory (default saved_models/<run-name>; 'none' to skip)")
    a("--overwrite", action="store_true", help="replace an existing run directory / export")
    a("--resume", action="store_true", help="continue the run in --run-dir from its last completed epoch")
    a("--keep-resume-state", action="store_true",
      help="keep resume.npz (every weight and optimizer moment: 283 MB for resnet50) when the run finishes, so that "
           "--resume --epochs N can extend it; by default it is removed then (an interrupted run always keeps it)")
    _multihost_flags(p.add_argument_group("multi-host training (JAX backend; see README)"))
    return p


def _multihost_flags(d) -> None:
    d.add_argument("--distributed", action="store_true",
                   help="one of several processes (hosts) training together through keras.distribution: joins the "
                        "cluster from SLURM, the KERAS_DISTRIBUTION_* variables, or the three flags below")
    d.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="--distributed: process 0's address")
    d.add_argument("--num-processes", type=int, default=None, help="--distributed: how many processes in all")
    d.add_argument("--process-id", type=int, default=None, help="--distributed: this process's index, 0..N-1")


def _weights(args) -> str:
    if args.preset is None:
        return args.weights
    if args.weights != "auto":
        raise ConfigError("give either --preset or --weights, not both.")
    if os.path.isdir(args.preset):
        return str(Path(args.preset).absolute())
    if args.preset.startswith("hf://"):
        return args.preset
    if os.sep in args.preset or args.preset.startswith("."):
        raise ConfigError(f"--preset {args.preset}: no such folder (a preset name has no slashes).")

    return PRESET + args.preset


def _crop(value: str) -> str:
    if A.LungCrop.of_config(value) is not A.LungCrop.MODEL:
        return value
    if not Path(value).exists():
        raise ConfigError(f"--lung-crop {value}: neither 'given' nor an existing segmentation run/model.")
    return str(Path(value).absolute())


def config_from_args(args) -> TrainConfig:
    demo = args.data is None
    pick = lambda v, d: d if v is None else v  # noqa: E731
    if not demo and not Path(args.data).exists():
        raise DataError(f"--data {args.data}: no such file or folder.")
    return TrainConfig(
        task=args.task, arch=args.arch, data=None if demo else str(Path(args.data).absolute()),
        weights=_weights(args), freeze_encoder=args.freeze_encoder, label_fraction=args.label_fraction,
        image_size=pick(args.image_size, DEMO["image_size"] if demo else 224), batch_size=pick(args.batch_size, 32),
        epochs=pick(args.epochs, DEMO["epochs"] if demo else 10),
        fine_tune_epochs=pick(args.fine_tune_epochs, DEMO["fine_tune_epochs"] if demo else 10),
        unfreeze=args.unfreeze, lr=args.lr, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        dropout=args.dropout, bn_momentum=args.bn_momentum, warmup_epochs=args.warmup_epochs,
        class_weights=not args.no_class_weights, contrast=args.contrast,
        augment=AugmentConfig.none() if args.no_augment else AugmentConfig(hflip=args.hflip), split=args.split,
        seed=args.seed, monitor=("" if args.monitor == "auto" else args.monitor), patience=args.patience,
        mixed_precision=args.mixed_precision, jit_compile=args.jit_compile, cache_dir=args.cache_dir or "",
        workers=args.workers, lung_crop=_crop(args.lung_crop), demo=demo, target=args.target, seg_loss=args.seg_loss,
        loss_weights=args.loss_weights, run_dir=args.run_dir or "", export_dir=args.export_dir or "",
        keep_resume_state=args.keep_resume_state,
        command=shlex.join(["python", "-m", "covidcxr.train", *args.argv]))


def resumed_config(args, parser) -> TrainConfig:
    """The saved config of ``--run-dir``, with --epochs/--fine-tune-epochs applied; any other flag
    that differs from the saved run is refused (never silently ignored)."""
    if not args.run_dir:
        raise ConfigError("--resume needs --run-dir of the run to continue.")
    path = Path(args.run_dir) / A.CONFIG
    if not path.exists():
        raise ConfigError(f"--resume: {args.run_dir} holds no interrupted run (no {A.CONFIG}); pass the --run-dir "
                          f"of the run to continue.")
    saved = TrainConfig.load(path)
    given = cli.explicit(args.argv, parser) - {"resume", "run_dir", "verbose", "overwrite"}
    fresh = config_from_args(args)
    changed = []
    for dest in sorted(given - RESUMABLE - {"no_augment", "hflip", "no_class_weights", "preset"}):
        if hasattr(saved, dest) and getattr(fresh, dest) != getattr(saved, dest):
            changed.append(f"--{dest.replace('_', '-')} {getattr(fresh, dest)} (the run has {getattr(saved, dest)})")
    if changed:
        raise ConfigError("--resume continues the run as it was configured; these flags differ: "
                          + "; ".join(changed) + ". Start a new run (another --run-dir) to change them.")
    return replace(saved, run_dir=str(Path(args.run_dir)), **{k: getattr(fresh, k) for k in given & RESUMABLE})


def run(args) -> int:
    if args.arch == catalog.LIST:
        print(catalog.format_table())
        return 0
    multihost.start(multihost.launch_from_args(args.distributed, args.coordinator, args.num_processes,
                                               args.process_id, keras.backend.backend()))
    try:
        return _run(args)
    except Exception as exc:
        raise multihost.named(exc) from exc


def _run(args) -> int:
    parser = build_parser()
    cfg = resumed_config(args, parser) if args.resume else config_from_args(args)
    cfg.validate()
    multihost.check_config(cfg)
    if cfg.crop and not get_task(cfg.task).only_classifies:
        raise ConfigError("--lung-crop applies to classification (--task classify).")
    if cfg.crop is A.LungCrop.MODEL:
        check_segmenter(cfg.lung_crop)
    train(cfg, overwrite=args.overwrite, resume=args.resume)
    return 0


_main = cli.entry(build_parser, run)


def main(argv: list[str] | None = None) -> int:
    return multihost.end(_main(argv))  # a failed process of a distributed run exits at once

if __name__ == "__main__":
    raise SystemExit(main())

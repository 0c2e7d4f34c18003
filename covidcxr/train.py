"""Train a CXR classifier: ``python -m covidcxr.train --arch resnet50``.

Without ``--data`` it trains on the built-in synthetic demo set. Each run gets
its own directory (config.json, manifest.csv, history.csv, best.keras,
curves.png, metrics.json, TensorBoard logs) and an export under saved_models/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from covidcxr.config import TrainConfig
from covidcxr.data.pipeline import AugmentConfig
from covidcxr.errors import ConfigError, CovidCXRError, DataError, RunExistsError

DEMO = dict(per_class=100, synth_size=128, image_size=128, epochs=4, fine_tune_epochs=4, batch_size=32)


def build_parser() -> argparse.ArgumentParser:
    from covidcxr.models.registry import arch_names

    p = argparse.ArgumentParser(prog="python -m covidcxr.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default=None, help="dataset folder (Kaggle, COVID-QU-Ex or folder-per-class) or manifest "
                                  "CSV; omitted: the synthetic demo set")
    a("--arch", default="resnet50", help=f"classify: one of {', '.join(arch_names())}. segment/multitask: unet, "
                                         f"or unet_/unetpp_/deeplabv3plus_<backbone>, e.g. unet_resnet50")
    a("--task", default="classify", choices=["classify", "segment", "multitask"],
      help="classify; segment (one-channel mask); multitask (label + mask from one U-Net)")
    a("--target", default="lung", choices=["lung", "infection"], help="segment/multitask: which masks to learn")
    a("--seg-loss", default="bce_dice", choices=["bce_dice", "dice", "focal"], help="segment/multitask mask loss")
    a("--loss-weights", default="label=1,mask=1", help="multitask: weights of the label and mask losses")
    a("--weights", default="auto", help="imagenet | none | PATH (local weights file or keras-hub preset "
                                        "folder) | auto (imagenet if obtainable, else none, with a warning)")
    a("--preset", default=None, help="keras-hub archs: a preset name (downloaded) or a local preset folder "
                                     "(save_to_preset); same as --weights for a folder")
    a("--freeze-encoder", action="store_true", help="train the head only, encoder frozen throughout (linear probe)")
    a("--label-fraction", type=float, default=1.0,
      help="train on a stratified, seeded fraction of the training split (label-efficiency studies)")
    a("--image-size", type=int, default=None, help="input side in pixels (default 224; demo 128)")
    a("--batch-size", type=int, default=None, help="global batch size (default 32)")
    a("--epochs", type=int, default=None, help="phase-1 epochs: head only on a frozen backbone "
                                                "(default 10; demo 4)")
    a("--fine-tune-epochs", type=int, default=None, help="phase-2 epochs: top layers unfrozen at lr/10 "
                                                          "(default 10; demo 4)")
    a("--unfreeze", default="all", help="phase 2 unfreezes the top N backbone layers, or 'all' "
                                        "(BatchNormalization stays frozen)")
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
      help="classify lung-cropped images (segmented-lung study): 'given' multiplies each image by its own lung mask "
           "(every image needs one); SEGMENTER (a --task segment --target lung run or export) predicts the masks")
    a("--split", default="0.7,0.15,0.15", help="train,val[,test] fractions when the data has no split")
    a("--seed", type=int, default=42, help="seed for splits, shuffling, augmentation and initialisation")
    a("--monitor", default="auto", choices=["auto", "val_macro_f1", "val_macro_auc", "val_dice"],
      help="checkpoint selection metric (auto: val_dice for segment, val_macro_f1 otherwise)")
    a("--patience", type=int, default=8, help="early-stopping patience (epochs)")
    a("--mixed-precision", action="store_true", help="float16 (GPU) / bfloat16 (TPU, CPU) compute")
    a("--jit-compile", action="store_true", help="XLA-compile the training step")
    a("--cache", default="memory", help="'memory', 'none' or a file prefix for the decoded-image cache")
    a("--run-dir", default=None, help="run directory (default experiments/runs/<arch>-<task>-<time>)")
    a("--export-dir", default=None, help="export directory (default saved_models/<run-name>; 'none' to skip)")
    a("--overwrite", action="store_true", help="replace an existing run directory / export")
    a("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    return p


def config_from_args(args, argv) -> TrainConfig:
    demo = args.data is None
    pick = lambda v, d: d if v is None else v  # noqa: E731
    aug = None if args.no_augment else AugmentConfig(hflip=args.hflip)
    return TrainConfig(
        task=args.task, arch=args.arch, data=None if demo else str(Path(args.data).absolute()),
        weights=_weights_arg(args), freeze_encoder=args.freeze_encoder, label_fraction=args.label_fraction,
        image_size=pick(args.image_size, DEMO["image_size"] if demo else 224),
        batch_size=pick(args.batch_size, 32),
        epochs=pick(args.epochs, DEMO["epochs"] if demo else 10),
        fine_tune_epochs=pick(args.fine_tune_epochs, DEMO["fine_tune_epochs"] if demo else 10),
        unfreeze=args.unfreeze, lr=args.lr, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, dropout=args.dropout, bn_momentum=args.bn_momentum,
        warmup_epochs=args.warmup_epochs, class_weights=not args.no_class_weights, contrast=args.contrast,
        augment=aug if aug is not None else AugmentConfig(0, 0, 0, False, 0, 0), split=args.split,
        seed=args.seed, monitor=(("val_dice" if args.task == "segment" else "val_macro_f1")
                                 if args.monitor == "auto" else args.monitor), patience=args.patience, mixed_precision=args.mixed_precision,
        jit_compile=args.jit_compile, cache=args.cache, lung_crop=_crop_arg(args.lung_crop), demo=demo,
        target=args.target, seg_loss=args.seg_loss, loss_weights=args.loss_weights,
        command="python -m covidcxr.train " + " ".join(argv),
    )


def _weights_arg(args) -> str:
    if args.preset is None:
        return args.weights
    if args.weights != "auto":
        raise ConfigError("give either --preset or --weights, not both.")
    if os.path.isdir(args.preset):
        return str(Path(args.preset).absolute())
    if os.sep in args.preset or args.preset.startswith("."):
        raise ConfigError(f"--preset {args.preset}: no such folder (a preset name has no slashes).")
    from covidcxr.models.registry import PRESET

    return PRESET + args.preset


def label_subset(df, fraction: float, seed: int):
    """Keep a stratified, seeded ``fraction`` of the training rows (at least one per class);
    the others get split 'unused' so the manifest still lists them."""
    import numpy as np

    if fraction >= 1.0:
        return df
    rng = np.random.default_rng(seed)
    df = df.copy()
    for label, idx in df[df["split"] == "train"].groupby("label").groups.items():
        idx = np.array(sorted(idx))
        keep = max(1, int(round(fraction * len(idx))))
        drop = rng.permutation(idx)[keep:]
        df.loc[drop, "split"] = "unused"
    return df


def _crop_arg(value: str) -> str:
    if value in ("", "given"):
        return value
    if not Path(value).exists():
        raise ConfigError(f"--lung-crop {value}: neither 'given' nor an existing segmentation run/model.")
    return str(Path(value).absolute())


def demo_data(cache_root: Path) -> Path:
    """Build (once) and reuse the synthetic demo set."""
    from covidcxr.data.synth import write_synthetic_dataset

    d = cache_root / f"demo-{DEMO['per_class']}x{DEMO['synth_size']}px-seed0"
    if not (d / ".complete").exists():
        if d.exists():
            shutil.rmtree(d)
        write_synthetic_dataset(d, DEMO["per_class"], DEMO["synth_size"], seed=0)
        (d / ".complete").write_text("ok\n")
    return d


def load_data(cfg: TrainConfig, cache_root: Path):
    """Manifest DataFrame and class names for the run; missing files dropped with a warning."""
    from covidcxr.data.manifest import build_manifest, read_manifest
    from covidcxr.data.splits import parse_fractions

    fractions = parse_fractions(cfg.split)
    src = Path(cfg.data) if cfg.data else demo_data(cache_root)
    if src.is_file():
        df = read_manifest(src)
        print(f"manifest: {src} ({len(df)} images)")
    else:
        df, report = build_manifest(src, fractions, cfg.seed)
        print(f"indexed {report.root}: {report.layout} layout, {len(df)} images; split: {report.split_source}")
        if report.problems:
            print(f"WARNING: {len(report.problems)} problem file(s) left out, e.g.:")
            for pr in report.problems[:5]:
                print(f"  - {pr}")
        groups = report.dedup.duplicate_groups
        print(f"duplicate groups: {len(groups)} ({sum(map(len, groups.values()))} images), kept within one split")
        if report.crossing_groups:
            print(f"WARNING: {len(report.crossing_groups)} duplicate groups cross the dataset's own split "
                  f"(see python -m covidcxr.data audit {src})")
    missing = [p for p in df["path"] if not os.path.exists(p)]
    if missing:
        if len(missing) == len(df):
            raise DataError(f"none of the manifest's image files exist (first: {missing[0]}); were they moved? "
                            f"Re-run python -m covidcxr.data index.")
        print(f"WARNING: {len(missing)} image file(s) missing and left out, e.g. {missing[0]}")
        df = df[~df["path"].isin(set(missing))].reset_index(drop=True)
    classes = sorted(df["label"].unique())
    for split in ("train", "val"):
        if not (df["split"] == split).any():
            raise DataError(f"the '{split}' split is empty; use --split with a non-zero {split} fraction "
                            f"or a manifest that has {split} rows.")
    counts = df[df["split"] == "train"]["label"].value_counts()
    empty = [c for c in classes if counts.get(c, 0) == 0]
    if empty:
        raise DataError(f"class(es) {empty} have no training images; add images or remove the class.")
    return df, classes


def pick_strategy():
    import tensorflow as tf

    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver), "TPU"
        except Exception as exc:
            print(f"WARNING: TPU requested by the environment but not usable ({exc}); continuing without it")
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(), f"{len(gpus)} GPUs (MirroredStrategy)"
    return tf.distribute.get_strategy(), ("1 GPU" if gpus else "CPU")


def _default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("experiments") / "runs" / f"{cfg.arch}-{cfg.task}-{stamp}"


def prepare_dirs(cfg: TrainConfig, run_dir: Path, export_dir: Path | None, overwrite: bool, resume: bool):
    if resume:  # train() has checked the run's state.json and config.json
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunExistsError(f"run directory {run_dir} already exists; pass --overwrite to replace it, "
                                 f"--resume to continue it, or another --run-dir.")
        shutil.rmtree(run_dir)
    if export_dir is not None and export_dir.exists() and any(export_dir.iterdir()) and not overwrite:
        raise RunExistsError(f"export directory {export_dir} already exists; pass --overwrite or another "
                             f"--export-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)


def _compile(model, cfg: TrainConfig, lr: float):
    import keras

    from covidcxr.losses import MaskScore, get_loss

    opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    cce = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    cls_metrics = ["accuracy", keras.metrics.AUC(name="auc", multi_label=False)]
    if cfg.task == "classify":
        model.compile(optimizer=opt, loss=cce, metrics=cls_metrics, jit_compile=cfg.jit_compile)
    elif cfg.task == "segment":
        # weighted_metrics: Keras passes sample weights (0 = no mask) to these, not to `metrics`.
        model.compile(optimizer=opt, loss=get_loss(cfg.seg_loss),
                      weighted_metrics=[MaskScore("dice"), MaskScore("iou")], jit_compile=cfg.jit_compile)
    else:
        model.compile(optimizer=opt, loss={"label": cce, "mask": get_loss(cfg.seg_loss)},
                      loss_weights=parse_loss_weights(cfg.loss_weights), metrics={"label": cls_metrics},
                      weighted_metrics={"mask": [MaskScore("dice"), MaskScore("iou")]},
                      jit_compile=cfg.jit_compile)


def resolve_spec(cfg: TrainConfig):
    """Registry spec (classify) or segmentation spec (segment/multitask), size checked."""
    from covidcxr.models.registry import check_image_size, get_spec

    if cfg.task == "classify":
        spec = get_spec(cfg.arch)
        check_image_size(spec, cfg.image_size)
        return spec
    from covidcxr.models.segmentation import seg_spec

    spec = seg_spec(cfg.arch)
    if cfg.image_size % spec.size_multiple or cfg.image_size < spec.size_multiple:
        raise ConfigError(f"--image-size {cfg.image_size} does not suit {cfg.arch}: use a multiple of "
                          f"{spec.size_multiple}.")
    return spec


def parse_loss_weights(text: str) -> dict[str, float]:
    try:
        parts = dict(kv.split("=") for kv in text.split(",")) if "=" in text else \
            dict(zip(("label", "mask"), text.split(",")))
        w = {k.strip(): float(v) for k, v in parts.items()}
    except ValueError:
        w = {}
    if set(w) != {"label", "mask"} or min(w.values()) < 0:
        raise ConfigError(f"--loss-weights {text!r}: write label=W1,mask=W2 (non-negative numbers).")
    return w


def train(cfg: TrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    spec = resolve_spec(cfg)
    if cfg.task == "multitask":
        parse_loss_weights(cfg.loss_weights)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else _default_run_dir(cfg)
    if resume:
        if not (run_dir / "state.json").exists() or not (run_dir / "config.json").exists():
            raise ConfigError(f"--resume: {run_dir} holds no interrupted run (no state.json/config.json); "
                              f"pass the --run-dir of the run to continue.")
        saved = TrainConfig.load(run_dir / "config.json")
        cfg = replace(saved, run_dir=str(run_dir))
    export_dir = None if cfg.export_dir == "none" else Path(cfg.export_dir or Path("saved_models") / run_dir.name)
    prepare_dirs(cfg, run_dir, export_dir, overwrite, resume)
    cfg = replace(cfg, run_dir=str(run_dir), export_dir=str(export_dir) if export_dir else "none")

    import warnings

    import keras
    import numpy as np

    # tf.data with skipped bad files has no fixed length; Keras' notes about it are noise.
    warnings.filterwarnings("ignore", message=".*ran out of data.*")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")

    import covidcxr.losses  # noqa: F401  (registers segmentation losses/metrics for load_model)
    from covidcxr import callbacks as cb
    from covidcxr.data.pipeline import class_weights, make_dataset
    from covidcxr.models.classifier import build_classifier, freeze_backbone, unfreeze_top

    if cfg.demo:
        print("=" * 78)
        print("DEMO RUN on built-in SYNTHETIC CXR-like images (not real X-rays).")
        print("Train on real data with --data DIR (see README). Small sizes so it ends in minutes.")
        print("=" * 78)
    keras.utils.set_random_seed(cfg.seed)
    if resume:
        import pandas as pd

        df = pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)
        classes = json.loads((run_dir / "labels.json").read_text())["classes"]
    else:
        df, classes = load_data(cfg, Path("experiments") / "cache")
    if cfg.label_fraction < 1.0 and not resume:
        before = int((df["split"] == "train").sum())
        df = label_subset(df, cfg.label_fraction, cfg.seed)
        kept = df[df["split"] == "train"]["label"].value_counts().sort_index()
        print(f"label fraction {cfg.label_fraction:g}: {int(kept.sum())} of {before} training images "
              f"({', '.join(f'{c} {n}' for c, n in kept.items())}); the rest are marked 'unused'")
    mask_col = f"{cfg.target}_mask"
    if cfg.lung_crop:
        from covidcxr import lungcrop

        if cfg.task != "classify":
            raise ConfigError("--lung-crop applies to classification (--task classify).")
        mask_col = lungcrop.CROP_COLUMN
        if not resume:
            df = lungcrop.prepare(df, cfg.lung_crop, cfg.image_size, run_dir)
    if cfg.task != "classify" and not resume:
        has = df[mask_col].astype(str) != "" if mask_col in df else df["path"] == "\0"
        if not has[df["split"] == "train"].any():
            raise DataError(f"--task {cfg.task} --target {cfg.target}: the training split has no {cfg.target} "
                            f"masks ({mask_col} is empty for every image). Use data with {cfg.target} masks "
                            f"(COVID-QU-Ex has lung and infection masks; the Kaggle set has lung masks).")
        if cfg.task == "segment":  # images without a mask teach a segmenter nothing
            df = df[has].reset_index(drop=True)
            if not (df["split"] == "val").any():
                raise DataError(f"no validation image has a {cfg.target} mask; cannot select checkpoints.")
        print(f"{cfg.target} masks: {int(has.sum())} of {len(has)} images"
              + ("" if cfg.task == "segment" else " (images without a mask train the classifier only: "
                                                  "mask loss weight 0)"))
    if not resume:
        df.to_csv(run_dir / "manifest.csv", index=False)
        (run_dir / "labels.json").write_text(json.dumps(_labels_doc(cfg, spec, classes), indent=2))
    train_df, val_df, test_df = (df[df["split"] == s] for s in ("train", "val", "test"))
    cw = class_weights(train_df["label"], classes) if cfg.class_weights and cfg.task != "segment" else None
    common = dict(image_size=cfg.image_size, normalization=spec.normalization, batch_size=cfg.batch_size,
                  contrast=cfg.contrast, lung_crop=bool(cfg.lung_crop), task=cfg.task, mask_column=mask_col)
    cache = None if cfg.cache == "none" else cfg.cache
    train_ds = make_dataset(train_df, classes, training=True, augment=cfg.augment, weights=cw, seed=cfg.seed,
                            cache=cache if cache == "memory" or cache is None else f"{cache}-train", **common)
    val_ds = make_dataset(val_df, classes, cache="memory" if cache else None, **common)

    strategy, device = pick_strategy()
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16" if "GPU" in device else "mixed_bfloat16")
    state = json.loads((run_dir / "state.json").read_text()) if resume else {}
    with strategy.scope():
        if resume:
            model = keras.saving.load_model(run_dir / "last.keras")
            weights = cfg.weights
        else:
            model, weights = _build(cfg, spec, len(classes), _builder(cfg, spec, len(classes), build_classifier))
            cfg = replace(cfg, weights=weights or "none")
    cfg.save(run_dir / "config.json")
    print(f"arch {cfg.arch} ({spec.source}), weights: {cfg.weights}, device: {device}, "
          f"{len(train_df)} train / {len(val_df)} val / {len(test_df)} test images, classes: {classes}")

    steps = int(np.ceil(len(train_df) / cfg.batch_size))
    ckpt = keras.callbacks.ModelCheckpoint(run_dir / "best.keras", monitor=cfg.monitor, mode="max",
                                           save_best_only=True, verbose=0)
    if state.get("best") is not None:
        ckpt.best = state["best"]

    def callbacks(phase, warmup):
        log = cb.PhaseLog(phase, len(train_df))
        cbs = ([cb.ValidationMetrics(val_ds, classes)] if cfg.task != "segment" else []) + [log, ckpt,
               keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode="max", patience=cfg.patience),
               keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, min_lr=1e-7),
               keras.callbacks.CSVLogger(run_dir / "history.csv", append=True),
               keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard")),
               cb.ResumeState(phase, run_dir, ckpt)]
        if warmup and cfg.warmup_epochs > 0:
            cbs.insert(0, cb.Warmup(lr_now, cfg.warmup_epochs * steps))
        return cbs, log

    verbose = 1 if sys.stdout.isatty() else 2
    pretrained = cfg.weights != "none"
    done = state.get("epoch", 0)
    phase = state.get("phase", "head" if pretrained else "scratch")
    summaries = []

    def run_phase(name, first_epoch, last_epoch, warmup):
        if last_epoch <= first_epoch:
            return first_epoch
        cbs, log = callbacks(name, warmup)
        hist = model.fit(train_ds, validation_data=val_ds, epochs=last_epoch, initial_epoch=first_epoch,
                         callbacks=cbs, verbose=verbose)
        n = len(hist.epoch)
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        line = (f"phase {name}: {n} epochs, {trainable:,} trainable weights, "
                f"{log.images_per_second:.1f} images/s (training steps)"
                + (f", {log.steady_images_per_second:.1f} after the first epoch"
                   if log.steady_images_per_second else ""))
        print(line, flush=True)
        summaries.append(line)
        return first_epoch + n

    with strategy.scope():
        if not pretrained:
            total = cfg.epochs + cfg.fine_tune_epochs
            print(f"weights none: the whole network trains from epoch 1 ({total} epochs = --epochs + "
                  f"--fine-tune-epochs), BatchNormalization momentum {cfg.bn_momentum}")
            lr_now = cfg.lr
            if cfg.freeze_encoder:
                print("--freeze-encoder: the randomly initialised encoder stays frozen; only the head trains "
                      "(a random-features baseline)")
                freeze_backbone(model)
            if not resume:
                _compile(model, cfg, cfg.lr)
            run_phase("scratch", done, total, warmup=not resume)
        else:
            e1 = done
            if phase == "head":
                lr_now = cfg.lr
                if not resume:
                    freeze_backbone(model)
                    _compile(model, cfg, cfg.lr)
                e1 = run_phase("head", done, cfg.epochs, warmup=not resume)
            if cfg.freeze_encoder:
                print("--freeze-encoder: linear probe; no fine-tuning phase")
            elif cfg.fine_tune_epochs > 0:
                lr_now = cfg.lr / 10
                if phase == "head":
                    if (run_dir / "best.keras").exists():
                        model.set_weights(keras.saving.load_model(run_dir / "best.keras").get_weights())
                    n = unfreeze_top(model, cfg.unfreeze)
                    print(f"phase finetune: {n} backbone layers unfrozen (BatchNormalization frozen), "
                          f"lr {lr_now:g}")
                    _compile(model, cfg, lr_now)
                    start = e1
                else:
                    start = done
                run_phase("finetune", start, start + cfg.fine_tune_epochs if phase == "head"
                          else _finetune_end(run_dir, cfg), warmup=False)

    best = keras.saving.load_model(run_dir / "best.keras") if (run_dir / "best.keras").exists() else model
    metrics = {"summary": summaries}
    for split, sdf in (("val", val_df), ("test", test_df)):
        if len(sdf):
            ds = val_ds if split == "val" else make_dataset(sdf, classes, cache=None, **common)
            metrics[split] = split_metrics(best, ds, classes, cfg.task)
            m = metrics[split]
            if "accuracy" in m:
                print(f"{split}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
                      f"macro-AUC {m['macro_auc'] if m['macro_auc'] is None else round(m['macro_auc'], 4)} "
                      f"(n={m['n']})")
            if "segmentation" in m:
                sm = m["segmentation"]
                print(f"{split}: {cfg.target} Dice {sm['dice']:.4f}, IoU {sm['iou']:.4f}, "
                      f"HD95 {sm['hd95'] if sm['hd95'] is None else round(sm['hd95'], 2)} px (n={sm['n']} masks)")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from covidcxr.plots import plot_history

    plot_history(run_dir / "history.csv", run_dir / "curves.png")
    if export_dir is not None:
        from covidcxr.export import export_classifier, export_segmenter

        export = export_classifier if cfg.task == "classify" else export_segmenter
        export(best, _labels_doc(cfg, spec, classes), export_dir, overwrite=True,
               check_images=val_df["path"].tolist()[:4], home=run_dir,
               check_masks=val_df[mask_col].tolist()[:4] if mask_col in val_df else None)
        print(f"exported: {export_dir} (SavedModel in {export_dir / 'serving' / '1'})")
    (run_dir / "state.json").write_text(json.dumps({**json.loads((run_dir / "state.json").read_text()),
                                                    "finished": True}))
    print(f"run directory: {run_dir}")
    return run_dir


def _finetune_end(run_dir: Path, cfg: TrainConfig) -> int:
    import pandas as pd

    hist = pd.read_csv(run_dir / "history.csv")
    head_epochs = int((hist["phase"] == 1).sum()) if "phase" in hist else cfg.epochs
    return head_epochs + cfg.fine_tune_epochs


def _labels_doc(cfg: TrainConfig, spec, classes) -> dict:
    doc = {"classes": list(classes), "arch": cfg.arch, "task": cfg.task, "image_size": cfg.image_size,
           "normalization": spec.normalization, "contrast": cfg.contrast,
           "lung_crop": "" if not cfg.lung_crop else ("given" if cfg.lung_crop == "given" else "model")}
    if cfg.task != "classify":
        doc["target"] = cfg.target
    return doc


def split_metrics(model, ds, classes, task: str) -> dict:
    """Classification figures (classify, multitask) and Dice/IoU/HD95 on images with masks."""
    import keras
    import numpy as np

    from covidcxr.metrics import classification_metrics
    from covidcxr.segmetrics import segmentation_metrics

    ys, ps, mt, mp, ml = [], [], [], [], []
    for x, y, w in ds:
        out = model(x, training=False)
        if task == "classify":
            ys.append(np.argmax(keras.ops.convert_to_numpy(y), -1))
            ps.append(keras.ops.convert_to_numpy(out))
            continue
        if task == "multitask":
            ys.append(np.argmax(keras.ops.convert_to_numpy(y["label"]), -1))
            ps.append(keras.ops.convert_to_numpy(out["label"]))
            out, y, w = out["mask"], y["mask"], w["mask"]
        keep = keras.ops.convert_to_numpy(w) > 0
        mt.append(keras.ops.convert_to_numpy(y)[keep])
        mp.append(keras.ops.convert_to_numpy(out)[keep])
    m = {}
    if ps:
        m = classification_metrics(np.concatenate(ys), np.concatenate(ps), classes)
    if mt and sum(len(a) for a in mt):
        m["segmentation"] = segmentation_metrics(np.concatenate(mt), np.concatenate(mp))
        m["segmentation"].pop("per_image")
    return m


def _builder(cfg: TrainConfig, spec, n_classes: int, build_classifier):
    """weights (None | 'imagenet' | path), bn_momentum -> model, for this task."""
    if cfg.task == "classify":
        return lambda w, bn: build_classifier(spec, n_classes, cfg.image_size, w, dropout=cfg.dropout,
                                              bn_momentum=bn)
    from covidcxr.models.segmentation import build_segmenter

    nc = n_classes if cfg.task == "multitask" else None
    return lambda w, bn: build_segmenter(cfg.arch, cfg.image_size, w, num_classes=nc, dropout=cfg.dropout,
                                         bn_momentum=bn)


def _build(cfg: TrainConfig, spec, n_classes: int, build):
    from covidcxr.models.registry import imagenet_available

    w = cfg.weights
    backbone = getattr(spec, "backbone", spec)  # segmentation specs wrap a registry backbone (or none)
    if w == "none" or backbone is None:
        if w not in ("none", "auto"):
            raise ConfigError(f"--weights {w}: {cfg.arch} has no pretrained encoder; use --weights none.")
        return build(None, cfg.bn_momentum), None
    if w == "auto":
        try:
            if backbone.source == "keras-hub" and not imagenet_available(backbone):
                raise ConfigError("keras-hub presets are not fetched automatically")
            return build("imagenet", None), "imagenet"
        except ConfigError as exc:
            print(f"WARNING: --weights auto: ImageNet weights unavailable ({str(exc)[:160]}...). "
                  f"Training FROM SCRATCH instead (--weights none). Pass --weights imagenet to make this an "
                  f"error, or --weights PATH for a local file.")
            return build(None, cfg.bn_momentum), None
    return build(w, None), w


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        from covidcxr.models.registry import get_spec

        if args.task == "classify":
            get_spec(args.arch)  # fail fast, before TensorFlow starts
        else:
            from covidcxr.models.segmentation import seg_spec

            seg_spec(args.arch)
        if args.data is not None and not Path(args.data).exists():
            raise DataError(f"--data {args.data}: no such file or folder.")
        if not 0 < args.label_fraction <= 1:
            raise ConfigError(f"--label-fraction {args.label_fraction}: use a fraction in (0, 1].")
        cfg = config_from_args(args, argv)
        if cfg.lung_crop:
            if cfg.task != "classify":
                raise ConfigError("--lung-crop applies to classification (--task classify).")
            if cfg.lung_crop != "given":
                from covidcxr.lungcrop import check_segmenter

                check_segmenter(cfg.lung_crop)
        cfg.run_dir = args.run_dir or ""
        cfg.export_dir = args.export_dir or ""
        if args.resume and not args.run_dir:
            raise ConfigError("--resume needs --run-dir of the run to continue.")
        train(cfg, overwrite=args.overwrite, resume=args.resume)
    except CovidCXRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with --resume --run-dir <run directory>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

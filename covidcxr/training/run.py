"""One training run, start to finish: folders, data, model, the loop, figures, export.

``train(cfg)`` is what ``python -m covidcxr.train`` calls after checking its arguments. Every
value was validated before this runs; here the data are indexed and checked before the run
folder is created, and a start that fails before its first epoch removes the folder again.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import keras
import pandas as pd

from covidcxr import artifacts as A
from covidcxr.augment import Augment
from covidcxr.cli import Interrupted
from covidcxr.config import AugmentConfig, TrainConfig
from covidcxr.data.cache import default_cache_dir
from covidcxr.errors import ConfigError, CovidCXRError, ExportFailedError, RunExistsError
from covidcxr.exporting import export_run
from covidcxr.inference import load_keras
from covidcxr.lungcrop import check_segmenter, copy_segmenter, predicted_masks
from covidcxr.modelcard import write_run as write_model_card
from covidcxr.models.weights import WeightsKind, WeightsSource
from covidcxr.plots import plot_history
from covidcxr.tasks import get_task
from covidcxr.training import devices as D
from covidcxr.training import multihost
from covidcxr.training.data import Batches, open_run_data
from covidcxr.training.linear_head import FeatureBatches, features, head_model
from covidcxr.training.loop import Loop, LoopState
from covidcxr.training.network import build_network, check_model
from covidcxr.training.phases import plan
from covidcxr.training.rows import check_split_sizes, class_weights, prepare_rows
from covidcxr.training.scores import segmentation_line, split_metrics, write_fingerprints
from covidcxr.training.trainee import Trainee


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("experiments") / "runs" / f"{cfg.arch}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_dirs(cfg: TrainConfig, overwrite: bool, resume: bool) -> tuple[Path, Path | None]:
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    export_dir = None if cfg.export_dir == "none" else Path(cfg.export_dir or Path("saved_models") / run_dir.name)
    if resume:
        if not (run_dir / A.STATE).exists() or not (run_dir / A.CONFIG).exists():
            raise ConfigError(f"--resume: {run_dir} holds no interrupted run (no {A.STATE}/{A.CONFIG}); pass the "
                              f"--run-dir of the run to continue.")
        if not (run_dir / A.RESUME).exists():
            raise ConfigError(f"--resume: {run_dir} has no {A.RESUME} (a finished run's is removed unless it was "
                              f"trained with --keep-resume-state); start a new run with another --run-dir.")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunExistsError(f"run directory {run_dir} already exists; pass --overwrite to replace it, --resume to "
                             f"continue it, or another --run-dir.")
    if export_dir is not None and export_dir.exists() and any(export_dir.iterdir()) and not overwrite:
        raise RunExistsError(f"export directory {export_dir} already exists; pass --overwrite or another "
                             f"--export-dir (or --export-dir none).")
    return run_dir, export_dir


# ---------------------------------------------------------------- model


def _card(cfg: TrainConfig, task, classes, backend: str) -> A.ModelCard:
    spec = task.spec(cfg.arch, cfg.image_size)
    norm = spec.normalization
    return A.ModelCard(list(classes), cfg.arch, cfg.task, cfg.image_size, norm if isinstance(norm, str) else "custom",
                       cfg.contrast, cfg.crop, cfg.target if task.segments else None, backend=backend)


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, overwrite: bool = False, resume: bool = False, log=print) -> Path:
    """Train as ``cfg`` says; returns the run folder. ``resume``: ``cfg`` is the saved config
    (with any extended epoch budget applied by the caller)."""
    cfg.validate()
    task = get_task(cfg.task)
    if not resume:  # a resumed run's model is in its folder (its --weights file may be gone)
        check_model(cfg, task)
    run_dir, export_dir = multihost.agreed(resolve_dirs, cfg, overwrite, resume)
    if not multihost.is_writer():  # process 0 writes the run folder; the others keep their files in a scratch folder
        run_dir, export_dir, log = multihost.scratch(run_dir, resume), None, multihost.replica_log(log)
    cfg = replace(cfg, run_dir=str(run_dir), export_dir=str(export_dir) if export_dir else "none",
                  monitor=cfg.monitor or task.default_monitor)
    if cfg.demo and not resume:
        log("=" * 78 + "\nDEMO RUN on built-in SYNTHETIC CXR-like images (not real X-rays).\nTrain on real data "
            "with --data DIR (see README). Small sizes so it ends in minutes.\n" + "=" * 78)
    created = False
    try:
        if resume:
            df = pd.read_csv(run_dir / A.MANIFEST, dtype=str, keep_default_na=False)
            classes, problems = A.ModelCard.load(run_dir).classes, []
        else:
            df, classes, problems = prepare_rows(cfg, task, log)
            if run_dir.exists() and overwrite:
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            created = True
            df = _lung_crop_masks(cfg, df, run_dir, log)
            df.to_csv(run_dir / A.MANIFEST, index=False)
            cfg.save(run_dir / A.CONFIG)
        return _train(cfg, task, df, classes, problems, run_dir, export_dir, resume, log)
    except KeyboardInterrupt:
        if (run_dir / A.STATE).exists():
            hint = shlex.join(["python", "-m", "covidcxr.train", "--resume", "--run-dir", str(run_dir)])
            raise Interrupted(f"continue with: {hint}") from None
        _remove_stub(run_dir, created, log)
        raise
    except BaseException:
        if not (run_dir / A.STATE).exists():
            _remove_stub(run_dir, created, log)
        raise
    finally:
        if not multihost.is_writer():
            shutil.rmtree(run_dir, ignore_errors=True)


def _remove_stub(run_dir: Path, created: bool, log) -> None:
    if created and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        log(f"(removed {run_dir}: the run never finished an epoch)", file=sys.stderr)


def _lung_crop_masks(cfg: TrainConfig, df: pd.DataFrame, run_dir: Path, log) -> pd.DataFrame:
    if cfg.crop is not A.LungCrop.MODEL:
        return df

    seg_dir = copy_segmenter(check_segmenter(cfg.lung_crop), run_dir)
    return predicted_masks(df, seg_dir, cfg.image_size, run_dir / A.CROP_MASKS, log=log)


def _train(cfg, task, df, classes, problems, run_dir, export_dir, resume, log) -> Path:
    data = open_run_data(df, classes, cfg.image_size, cfg.contrast,
                         mask_column=task.mask_column(cfg.target) if task.segments else None,
                         needs_mask=task.only_segments, crop_column="crop_mask" if cfg.crop else "",
                         cache_dir=cfg.cache_dir or None, workers=cfg.workers, progress=sys.stderr.isatty())
    c = data.cache
    log(f"input cache: {c.path} ({'built in %.1f s' % c.built_seconds if c.built_seconds else 'reused'}, "
        f"{int(c.ok.sum())} of {len(c.ok)} images)")
    if not resume:
        A.report_skipped(run_dir, problems + data.skipped, log)
    check_split_sizes(data)
    loop = _fit(cfg, task, data, run_dir, resume, log)
    if not multihost.is_writer():
        return run_dir
    multihost.local_only()
    export_failure = _finish(cfg, task, data, run_dir, export_dir, loop, log)
    if not cfg.keep_resume_state:
        _drop_resume_state(run_dir, log)
    if export_failure is not None:
        raise export_failure
    return run_dir


def _drop_resume_state(run_dir: Path, log) -> None:
    """A finished run needs no resume.npz (every weight and optimizer moment); an interrupted one keeps it."""
    path = run_dir / A.RESUME
    if path.exists():
        size = path.stat().st_size
        path.unlink()
        log(f"removed {path} ({size / 1e6:.1f} MB of resume state: the run finished; --keep-resume-state keeps it)")


def _fit(cfg, task, data, run_dir: Path, resume: bool, log):
    device = D.detect()
    policy = D.precision_policy(device, cfg.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    jit = device.backend == "jax" or D.use_jit(device, cfg.jit_compile)
    D.make_deterministic(cfg.seed, device)
    scope, how = multihost.distribution_scope(device, cfg.batch_size)
    with scope:
        if resume:
            net = keras.models.model_from_json((run_dir / "architecture.json").read_text())
            weights = cfg.weights
            if cfg.freeze_encoder and (run_dir / A.BEST).exists():  # the frozen encoder is in every checkpoint
                net.set_weights(keras.saving.load_model(run_dir / A.BEST).get_weights())
        else:
            net, weights = build_network(cfg, task, len(data.classes), log)
            cfg = replace(cfg, weights=weights)
            cfg.save(run_dir / A.CONFIG)
            (run_dir / "architecture.json").write_text(net.to_json())
            _card(cfg, task, data.classes, device.backend).save(run_dir)
        probe = cfg.freeze_encoder and task.only_classifies
        if probe:  # the head alone, on cached embeddings of the frozen encoder
            trainee = Trainee(head_model(net), Augment.from_config_object(AugmentConfig.none()), task)
        else:
            trainee = Trainee(net, Augment.from_config_object(cfg.augment, seed=cfg.seed), task)
    cw = class_weights(data.df["label"].iloc[data.rows("train")], data.classes) \
        if cfg.class_weights and task.classifies else None
    if probe:
        feats = features(net, data, Path(cfg.cache_dir or default_cache_dir()) / "embeddings", cfg.batch_size, log)
        train = FeatureBatches(data, feats, data.rows("train"), cfg.batch_size, shuffle=True, seed=cfg.seed,
                               class_weight=cw)
        val = FeatureBatches(data, feats, data.rows("val"), cfg.batch_size)
    else:
        train = Batches(data, data.rows("train"), cfg.batch_size, shuffle=True, seed=cfg.seed, class_weight=cw,
                        shard=multihost.local_rows(cfg.batch_size))
        val = Batches(data, data.rows("val"), cfg.batch_size)
    log(f"arch {cfg.arch}, weights {weights}, {device.describe()}, precision {policy}, XLA {'on' if jit else 'off'}"
        + (f", {how}" if how else "") + f"; {len(data.rows('train'))} train / {len(data.rows('val'))} val / "
        f"{len(data.rows('test'))} test images, classes {data.classes}")
    pretrained = WeightsSource.parse(weights).kind is not WeightsKind.NONE
    phases = plan(cfg, pretrained=pretrained)
    if not pretrained:
        log(f"weights none: the whole network trains from epoch 1 ({phases[0].epochs} epochs = --epochs + "
            f"--fine-tune-epochs), BatchNormalization momentum {cfg.bn_momentum}"
            + ("; --freeze-encoder: the random encoder stays frozen, only the head trains (a random-features "
               "baseline)" if cfg.freeze_encoder else ""))
    elif cfg.freeze_encoder:
        log("--freeze-encoder: linear probe (the head on cached embeddings, no augmentation); no fine-tuning phase")
    state = LoopState.load(run_dir) if resume else LoopState()
    if resume:
        _extend(state, phases)
    loop = Loop(trainee, task, cfg, phases, train, val, run_dir, jit_compile=jit, log=log,
                save_model=net if probe else None,
                after_epoch=multihost.weight_digest if multihost.current().distributed else None)
    loop.run(state)
    return loop


def _extend(state, phases) -> None:
    """After --resume with a longer budget, reopen a phase that ran out of epochs (not one that stopped early);
    a budget shorter than what already ran is refused."""
    if state.phase_index < len(phases) and state.epoch_in_phase > phases[state.phase_index].epochs:
        raise ConfigError(f"--resume: phase {phases[state.phase_index].name} already ran {state.epoch_in_phase} "
                          f"epochs, more than the {phases[state.phase_index].epochs} now asked for.")
    if state.phase_index < len(phases) and not state.stopped:
        if state.phase_finished and state.epoch_in_phase < phases[state.phase_index].epochs:
            state.phase_finished = False
    state.finished = False


def _finish(cfg, task, data, run_dir: Path, export_dir: Path | None, loop, log) -> ExportFailedError | None:
    best = load_keras(run_dir / A.BEST)
    metrics = {"summary": loop.summaries, "best_epoch": loop_state_best(run_dir)}
    for split in ("val", "test"):
        m = split_metrics(best, data, split, task, cfg.batch_size, getattr(loop.train, "feats", None))
        if m is None:
            continue
        metrics[split] = m
        if "accuracy" in m:
            auc = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
            log(f"{split}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, macro-AUC {auc} (n={m['n']})")
        if "segmentation" in m:
            log(segmentation_line(split, cfg.target, m["segmentation"]))
    A.atomic_write_text(run_dir / A.METRICS, json.dumps(metrics, indent=2))
    write_fingerprints(run_dir, data)
    plot_history(run_dir / A.HISTORY, run_dir / A.CURVES)
    write_model_card(run_dir, task)
    failure = _export(run_dir, export_dir, log) if export_dir is not None else None
    log(f"run directory: {run_dir}")
    return failure


def _export(run_dir: Path, export_dir: Path, log) -> ExportFailedError | None:
    """Export after training. A failure does not undo the run: the run folder is complete, its
    export_status.json says what failed, and the error returned gives the command that retries."""
    retry = shlex.join(["python", "-m", "covidcxr.export", str(run_dir), "--out", str(export_dir)])
    try:
        export_run(run_dir, export_dir, overwrite=True, log=log)
    except Exception as exc:  # any failure of the export, expected or not, leaves the finished run a success
        reason = str(exc) if isinstance(exc, CovidCXRError) else f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        status = {"ok": False, "export_dir": str(export_dir), "error": reason, "retry": retry,
                  "traceback": "" if isinstance(exc, CovidCXRError) else traceback.format_exc()}
        A.atomic_write_text(run_dir / A.EXPORT_STATUS, json.dumps(status, indent=2))
        log(f"EXPORT FAILED (the training run itself finished and is complete): {reason}", file=sys.stderr)
        log(f"retry the export with: {retry}", file=sys.stderr)
        return ExportFailedError(f"training finished ({run_dir}), but its export failed; retry with: {retry}")
    A.atomic_write_text(run_dir / A.EXPORT_STATUS, json.dumps({"ok": True, "export_dir": str(export_dir)}, indent=2))
    return None


def loop_state_best(run_dir: Path) -> dict:
    s = LoopState.load(run_dir)
    return {"epoch": s.best_epoch, "value": s.best}

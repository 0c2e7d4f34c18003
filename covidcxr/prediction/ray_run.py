"""``predict --engine ray``: the checks, the input list, the sidecar and the report around
``prediction/ray.py``'s scoring. The driver never loads the model (a JAX driver on a GPU node would
take the memory its actors need): it reads the model's card, resolves the temperature and the operating
point once, and passes them to every actor.

    python -m covidcxr.predict --model M --engine ray [--address auto] --actors N --gpus-per-actor G \\
        INPUTS... [--inputs-from LIST.txt] --out OUT.parquet

One Parquet file, one row per input in path order, with predict's columns and ``error`` ('' when the file
was scored); ``<out>.meta.json`` as predict writes it. Exit 1 when some inputs had errors (0 with
``--skip-bad``)."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from covidcxr.artifacts import LungCrop, atomic_write_text, locate
from covidcxr.errors import ConfigError
from covidcxr.inference import ModelFile, chosen_file
from covidcxr.prediction import ray as R
from covidcxr.prediction.flags import find_temperature, resolve as resolve_operating_point
from covidcxr.prediction.outputs import MASK_COLUMNS, check_table_free, model_identity, sidecar
from covidcxr.prediction.shards import list_digest
from covidcxr.tasks import get_task

SHOW_BAD = 5
RAY_FLAGS = ("address", "actors", "gpus_per_actor", "cpus_per_actor")


def check_ray_flags(args) -> None:
    """--address/--actors/--gpus-per-actor/--cpus-per-actor only with --engine ray."""
    given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f) is not None]
    if given and args.prefer != "ray":
        raise ConfigError(f"{', '.join(given)}: for --engine ray (the scoring on Ray Data); pass --engine ray or "
                          f"drop them.")


def _given(value, default):
    return default if value is None else value


def _refuse(args, loc, task) -> None:
    """Flags that --engine ray does not take, and those that do not fit this model."""
    rules = [(args.resume, "--resume: a Ray run is one job (Ray retries failed tasks); run it again with --overwrite"),
             (args.shard, "--shard: Ray spreads the inputs over its actors; drop --shard"),
             (args.gradcam or args.gradcam_layer, "--gradcam: use plain predict for Grad-CAM figures"),
             (args.lung_masks or loc.card.lung_crop is LungCrop.GIVEN,
              "lung-cropped classifiers (--lung-crop given, --lung-masks) need each input's mask: use plain predict"),
             (args.masks and not task.segments, "--masks is for segmentation and multi-task models"),
             (args.calibrated and not task.classifies, "--calibrated scales class probabilities"),
             (args.operating_point is not None and not task.classifies, "--operating-point flags a class"),
             (_given(args.actors, 1) < 1 or _given(args.gpus_per_actor, 0) < 0 or _given(args.cpus_per_actor, 1) <= 0,
              "--actors must be at least 1, --gpus-per-actor at least 0, --cpus-per-actor above 0")]
    for broken, why in rules:
        if broken:
            raise ConfigError(f"--engine ray: {why}.")
    if chosen_file(loc, ModelFile.KERAS) is not ModelFile.KERAS:
        raise ConfigError(f"--engine ray runs the Keras model (model.keras) in each actor; {loc.root} has none: "
                          f"pass the run or export folder.")


def run(args, out: Path, fmt: str, entries: list[str], bad: dict, masks: dict) -> int:
    """Score ``entries`` on Ray into ``out`` (Parquet) and write its meta sidecar; the exit code."""
    if fmt != "parquet":
        raise ConfigError(f"--engine ray writes Parquet (one file, one row per input): pass --out "
                          f"{out.with_suffix('.parquet')}.")
    check_table_free(out, False, args.overwrite)
    loc = locate(args.model)
    task = get_task(loc.card.task)
    _refuse(args, loc, task)
    temperature = find_temperature(args.model, args.calibration, loc.root) if args.calibrated else None
    op = resolve_operating_point(args.operating_point, args.model, loc.root, list(loc.card.classes)) \
        if args.operating_point is not None else None
    columns = task.output_columns(list(loc.card.classes), MASK_COLUMNS) + ([op["column"]] if op else []) + [R.ERROR]
    mask_dir = args.masks
    if mask_dir:
        Path(mask_dir).mkdir(parents=True, exist_ok=True)
    cluster = R.Cluster(args.address, _given(args.actors, 1), float(_given(args.gpus_per_actor, 0)),
                        float(_given(args.cpus_per_actor, 1)))
    meta = {"model": model_identity(loc, ModelFile.KERAS, args.model), "calibration": temperature, "format": fmt,
            "operating_point": op, "columns": columns, "shard": [1, 1],
            "inputs": {"count": len(entries), "sha256": list_digest(entries)},
            "engine": {"name": "ray", "address": cluster.address, "actors": cluster.actors, "gpus_per_actor": cluster.gpus,
                       "cpus_per_actor": cluster.cpus},
            "rows": 0, "skipped": 0, "complete": False, "masks_left_out": {"files": sum(masks.values()), "folders": masks}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sidecar(out, "meta.json"), json.dumps(meta, indent=2))
    dupes = {s for s, c in Counter(Path(p).stem for p in entries).items() if c > 1}
    kwargs = {"model": args.model, "batch_size": args.batch_size, "workers": args.workers, "engine": "keras",
              "temperature": temperature, "operating_point": op, "mask_dir": mask_dir, "dupes": dupes,
              "known_bad": bad}
    print(f"scoring {len(entries)} input(s) on Ray: {cluster.actors} actor(s), {cluster.gpus:g} GPU(s) and "
          f"{cluster.cpus:g} CPU(s) each, {'cluster ' + cluster.address if cluster.address else 'a local Ray'}",
          file=sys.stderr)
    first_bad = []
    labels = Counter()

    def seen(block):
        if "label" in block.column_names:
            labels.update(v for v in block.column("label").to_pylist() if v)
        for p, e in zip(block.column("path").to_pylist(), block.column(R.ERROR).to_pylist()):
            if e and len(first_bad) < SHOW_BAD:
                first_bad.append((p, e))

    stats = R.score(entries, out, cluster, kwargs, columns, on_rows=seen, progress=not args.quiet)
    meta.update(rows=stats["rows"] - stats["errors"], skipped=stats["errors"], complete=True,
                seconds={k: round(stats[k] or 0.0, 3) for k in ("seconds", "init_s", "first_rows_s")})
    atomic_write_text(sidecar(out, "meta.json"), json.dumps(meta, indent=2))
    shown = ", ".join(f"{c} {labels[c]}" for c in loc.card.classes if labels[c])
    print(f"wrote {out} ({stats['rows']} rows, {stats['errors']} with an error" + (f"; {shown}" if shown else "")
          + f"; {stats['rows'] / max(stats['seconds'], 1e-9):.1f} images/s including Ray's start-up)")
    if stats["errors"]:
        print(f"{stats['errors']} input(s) could not be scored (the 'error' column says why):", file=sys.stderr)
        for p, e in first_bad:
            print(f"  - {p}: {e}", file=sys.stderr)
    return 1 if stats["errors"] and not args.skip_bad else 0

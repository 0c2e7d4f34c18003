"""Score X-ray files with a trained model, at archive scale.

    python -m covidcxr.predict --model PATH INPUT... [--out predictions.csv] [options]
    python -m covidcxr.predict merge SHARD_OUT... --out ALL.csv

PATH: a run or export folder, a ``.keras`` file, a SavedModel folder, or ``hf://OWNER/NAME[@REVISION]``
(an export folder on the Hugging Face Hub, downloaded once into its cache; ``HF_HUB_OFFLINE=1``: the cache
only). ``--engine savedmodel`` / ``--engine onnx`` run an export's SavedModel / model.onnx (ONNX Runtime)
instead of its model.keras; ``--engine ray [--address auto] --actors N --gpus-per-actor G``: the Keras model in
a pool of Ray Data actors (covidcxr/prediction/ray.py), into one Parquet file with an ``error`` column (a
file that cannot be read is a row, not a failed job). ``--inputs-from LIST``: more inputs, one path per
line (with --engine ray also ``s3://``, ``gs://``... URIs, read through pyarrow's filesystems). INPUTs:
image files and folders (searched
recursively, except a dataset's mask folders: ``masks/``, ``lung masks/`` and ``infection masks/``
beside an ``images/`` folder are left out and listed), taken in sorted path order. ``--workers``
threads decode a few batches ahead of the model, which runs once per ``--batch-size`` batch
(covidcxr/inference.py); each finished batch is appended to the output and flushed, so memory does
not grow with the number of files.

Output (``--format csv|parquet``, default from the --out suffix): path, label, prob_<class>...
(classifiers, multi-task), mask_path, mask_fraction, height, width (segmenters, multi-task), floats
at full precision, rows in path order. Parquet goes to one closed file per batch under
``<out>.parts/`` while running and is joined into ``<out>`` at the end. Beside the output:
``<out>.skipped.csv`` (path, reason): every input that was missing or unreadable (exit 1 unless
``--skip-bad``); ``<out>.meta.json``: the model (path, kind, sha256 of its files, classes, task), the
temperature, format and columns, the shard, the input list's count and sha256, rows, skipped, complete.

``--resume`` continues a killed run: rows and skipped inputs already written are kept (a partial last
line is cut) and the rest appended, so the result equals an uninterrupted run, order included; it
refuses an output of another model, temperature, shard or input list. ``--shard K/N`` (K = 1..N)
scores the paths whose sha1 is K-1 modulo N (give every shard the same INPUT arguments, from the same
folder: the path strings are hashed); ``merge`` joins all N shards in path order (the output one
unsharded run writes) after checking that they are complete, of one model and input list, and hold
every input exactly once.

``--calibrated`` applies the temperature fitted by ``covidcxr.evaluate`` (calibration.json beside the
model, or ``--calibration FILE``); ``--gradcam DIR``: one Grad-CAM figure per input (Keras
classifiers); ``--masks DIR``: where segmenters write one mask PNG per input at its own size (default
``<out stem>_masks``); ``--lung-masks DIR``: each input's lung mask (same file name), for classifiers
trained with ``--lung-crop given``. ``--operating-point [FILE|CLASS:threshold=T]`` adds a
``flag_<class>`` column, 1 where p(class) >= the threshold (on the uncalibrated probability, as it was
chosen, even with --calibrated): bare (put it after the inputs), the operating_point.json that
``covidcxr.evaluate --operating-point`` saved beside the model.
Exit codes: 0; 1 inputs skipped; 2 usage error; 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

from covidcxr import cli

with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    import pandas as pd
    from tqdm import tqdm
    from covidcxr.artifacts import LungCrop, atomic_write_text
    from covidcxr.errors import ConfigError, DataError, RunExistsError
    from covidcxr.gradcam import GradCAM
    from covidcxr.inference import Item, Predictor
    from covidcxr.prediction import ray_run
    from covidcxr.prediction.flags import find_temperature, resolve as resolve_operating_point
    from covidcxr.prediction.outputs import (CsvTable, MASK_COLUMNS, SKIP_COLUMNS, check_table_free, existing, mismatch,
                                             model_identity,
                                             open_table, pyarrow_module, read_meta, remove, sidecar)
    from covidcxr.prediction.scoring import Scorer
    from covidcxr.prediction.shards import (build_merge_parser, in_shard, input_list, list_digest, parse_shard,
                                            is_uri, read_input_list, run_merge)

SHOW_BAD = 5          # skipped inputs named on stderr; all of them are in <out>.skipped.csv
PREVIEW = 10          # rows echoed on stdout at the end


# ------------------------------------------------------------------ the model and its identity

def _check_flags(args, pred) -> None:
    """Refuse a flag that does not apply to this model (its task, its kind, its lung crop)."""
    task, crop = pred.task, pred.card.lung_crop
    rules = [(args.masks and not task.segments, "--masks is for segmentation and multi-task models"),
             (args.calibrated and not task.classifies, "--calibrated scales class probabilities"),
             (args.gradcam and not task.only_classifies, "--gradcam draws class heatmaps of classifiers"),
             (args.gradcam_layer and not args.gradcam, "--gradcam-layer needs --gradcam"),
             (args.operating_point is not None and not task.classifies, "--operating-point flags a class"),
             (args.lung_masks and crop is not LungCrop.GIVEN, "--lung-masks is for classifiers trained with --lung-crop given"),
             (crop is LungCrop.GIVEN and not args.lung_masks, "this classifier was trained on lung-cropped images "
                                                       "(--lung-crop given): pass --lung-masks DIR, each input's "
                                                       "lung mask under its file name")]
    pred.require_keras(*(["--gradcam"] if args.gradcam else []))
    for broken, why in rules:
        if broken:
            raise ConfigError(f"{why}; --model {args.model} is a {task.name} model ({pred.kind}"
                              f"{', lung crop ' + crop if crop else ''}).")


# ------------------------------------------------------------------ the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, export folder, .keras file, SavedModel folder or "
                                                  "hf://OWNER/NAME[@REVISION] (an export on the Hugging Face Hub)")
    p.add_argument("inputs", nargs="*", help="image files or folders (an input named 'merge' first: ./merge)")
    p.add_argument("--inputs-from", default=None, metavar="LIST",
                   help="a text file of input paths, one per line (with --engine ray: local, s3://, gs://...)")
    p.add_argument("--out", default=None, help="output file (default predictions.csv / predictions.parquet)")
    p.add_argument("--format", choices=("csv", "parquet"), default=None, help="default: from the --out suffix")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU cores, at most 8)")
    p.add_argument("--engine", "--prefer", dest="prefer", choices=("keras", "savedmodel", "onnx", "ray"), default="keras",
                   help="which model file of the folder runs: keras (default), savedmodel, onnx (model.onnx, ONNX "
                        "Runtime); ray: the Keras model in a pool of Ray Data actors, into one Parquet file")
    ray = p.add_argument_group("--engine ray (pip install \"covidcxr[ray]\")")
    ray.add_argument("--address", default=None, help="Ray cluster to join (auto: the running one; default: start "
                                                     "a local Ray)")
    ray.add_argument("--actors", type=int, default=None, help="actors, one model each (default 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs each actor reserves (default 0)")
    ray.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs each actor reserves (default 1)")
    p.add_argument("--shard", default=None, metavar="K/N", help="score shard K (1..N) of N of the inputs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted output (same command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when inputs were missing or unreadable")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no preview table")
    p.add_argument("--calibrated", action="store_true", help="apply the temperature fitted by covidcxr.evaluate")
    p.add_argument("--calibration", default=None, metavar="FILE", help="calibration.json to use (implies --calibrated)")
    p.add_argument("--operating-point", nargs="?", const="", default=None, metavar="FILE|SPEC",
                   help="add flag_<class> (1/0) at an operating point: bare (after the inputs), the "
                        "operating_point.json beside the model; or a FILE; or CLASS:threshold=T")
    p.add_argument("--gradcam", default=None, metavar="DIR", help="write a Grad-CAM figure per input into DIR")
    p.add_argument("--gradcam-layer", default=None, help="layer inside the backbone (default: its last block)")
    p.add_argument("--masks", default=None, metavar="DIR", help="segmentation/multi-task: folder for the mask PNGs")
    p.add_argument("--lung-masks", default=None, metavar="DIR",
                   help="classifiers trained with --lung-crop given: each input's lung mask, same file name")
    return p


def _out_and_format(args) -> tuple[Path, str]:
    fmt = args.format or ("parquet" if args.out and Path(args.out).suffix.lower() in (".parquet", ".pq") else "csv")
    if fmt == "parquet":
        pyarrow_module()
    return Path(args.out or f"predictions.{fmt}"), fmt


def _folder(path: str, flag: str, args) -> Path:
    d = Path(path)
    if d.is_dir() and any(d.iterdir()) and not (args.overwrite or args.resume):
        raise RunExistsError(f"{flag} {d} already holds files; pass --overwrite, --resume or another folder.")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _scorer(args, pred, out: Path, entries: list[str]) -> Scorer:
    """The Scorer of this command: temperature, mask and Grad-CAM folders, the file stems used twice."""
    temperature = find_temperature(args.model, args.calibration, pred.located.root) if args.calibrated else None
    mask_dir = cam = cam_dir = None
    if pred.task.segments:
        mask_dir = _folder(args.masks or str(out.with_name(out.stem + "_masks")), "--masks", args)
    if args.gradcam:
        cam, cam_dir = GradCAM(pred.model, args.gradcam_layer), _folder(args.gradcam, "--gradcam", args)
    dupes = {s for s, c in Counter(Path(p).stem for p in entries).items() if c > 1}
    op = None
    if args.operating_point is not None:
        op = resolve_operating_point(args.operating_point, args.model, pred.located.root, pred.classes)
        print(f"operating point: {op['column']} = 1 where p({op['class']}) >= {op['threshold']:.6g} ({op['source']})")
    return Scorer(pred.classes, temperature, mask_dir, cam, cam_dir, dupes, op)


def _resume(out: Path, tables, meta: dict) -> list[list[str]]:
    """The paths each table already holds, after checking the output is of this model and input list."""
    why = mismatch(read_meta(out), meta, ("calibration", "operating_point", "format", "columns", "shard", "inputs"))
    if why:
        raise DataError(f"--resume: {out} was written with {why}; pass the same arguments, another --out, or "
                        f"--overwrite to start again.")
    done = []
    for t in tables:
        t.repair()
        done.append([r["path"] for r in t.rows()])
    return done


def run(args) -> int:
    """Check the arguments and the model, then score this shard's inputs not yet in the output."""
    k, n = parse_shard(args.shard)
    args.calibrated = args.calibrated or bool(args.calibration)
    ray_run.check_ray_flags(args)
    out, fmt = _out_and_format(args)
    if args.batch_size < 1 or (args.workers or 1) < 1:
        raise ConfigError(f"--batch-size {args.batch_size} / --workers {args.workers}: must be at least 1.")
    entries, bad, masks = _inputs(args)
    if args.prefer == "ray":
        _report_masks(masks, out)
        return ray_run.run(args, out, fmt, entries, bad, masks)
    check_table_free(out, args.resume, args.overwrite)
    pred = Predictor(args.model, args.batch_size, args.workers, args.prefer)
    _check_flags(args, pred)
    _report_masks(masks, out)
    mine = [p for p in entries if in_shard(p, k, n)]
    scorer = _scorer(args, pred, out, entries)
    columns = pred.task.output_columns(pred.classes, MASK_COLUMNS) + ([scorer.op["column"]] if scorer.op else [])
    meta = {"model": model_identity(pred.located, pred.kind, args.model), "calibration": scorer.temperature, "format": fmt,
            "operating_point": scorer.op,
            "columns": columns, "shard": [k, n], "inputs": {"count": len(entries), "sha256": list_digest(entries)},
            "shard_count": len(mine), "rows": 0, "skipped": 0, "complete": False,
            "masks_left_out": {"files": sum(masks.values()), "folders": masks}}
    table, skipped = open_table(out, columns, fmt), CsvTable(sidecar(out, "skipped.csv"), SKIP_COLUMNS)
    if args.overwrite:
        remove(out)
    done = _resume(out, (table, skipped), meta) if args.resume and existing(out) else [[], []]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sidecar(out, "meta.json"), json.dumps(meta, indent=2))
    table.write([])
    seen = set(done[0]) | set(done[1])
    stats = _score(args, pred, scorer, (table, skipped), [p for p in mine if p not in seen], bad)
    table.finish()
    meta.update(rows=len(done[0]) + stats["rows"], skipped=len(done[1]) + stats["bad"], complete=True)
    atomic_write_text(sidecar(out, "meta.json"), json.dumps(meta, indent=2))
    _report(args, out, meta, stats, len(done[0]), len(done[1]), scorer)
    return 1 if meta["skipped"] and not args.skip_bad else 0


def _inputs(args) -> tuple[list[str], dict, dict]:
    """The INPUT arguments and the --inputs-from list, expanded (input_list); URIs only for --engine ray."""
    given = list(args.inputs) + (read_input_list(args.inputs_from) if args.inputs_from else [])
    if not given:
        raise ConfigError("no inputs: pass image files or folders, or --inputs-from LIST.")
    uri = next((p for p in given if is_uri(p)), None)
    if uri and args.prefer != "ray":
        raise ConfigError(f"{uri}: a URI; object storage is read by --engine ray (through pyarrow's filesystems). "
                          f"Pass --engine ray, or local paths.")
    return input_list(given, uris=args.prefer == "ray")


def _score(args, pred, scorer: Scorer, tables, todo: list[str], bad: dict) -> dict:
    """Run the model over ``todo``, appending each batch's rows and failures as it finishes; returns
    counts, the first few failures and rows (memory stays flat however many files there are)."""
    table, skipped = tables
    lung = Path(args.lung_masks) if args.lung_masks else None
    items = (Item(p, _lung_mask(lung, p)) for p in todo if p not in bad)
    known = [{"path": p, "reason": bad[p]} for p in todo if p in bad]
    if known:  # <out>.skipped.csv exists only when something was skipped
        skipped.write(known)
    stats = {"rows": 0, "bad": len(known), "first_bad": known[:SHOW_BAD], "labels": Counter(), "preview": []}
    bar = tqdm(total=len(todo), initial=len(known), unit="img", file=sys.stderr, disable=args.quiet)
    try:
        for batch in pred.run(items, keep_gray=scorer.cam is not None):
            rows = scorer.rows(batch)
            failed = [{"path": d.item.path, "reason": d.reason} for d in batch.failed]
            table.write(rows)
            if failed:
                skipped.write(failed)
            stats["rows"], stats["bad"] = stats["rows"] + len(rows), stats["bad"] + len(failed)
            stats["first_bad"] += failed[:SHOW_BAD - len(stats["first_bad"])]
            stats["preview"] += rows[:PREVIEW - len(stats["preview"])]
            stats["labels"].update(r["label"] for r in rows if "label" in r)
            bar.update(len(rows) + len(failed))
    except KeyboardInterrupt:
        hint = shlex.join(["python", "-m", "covidcxr.predict", *args.argv] + ([] if args.resume else ["--resume"]))
        raise cli.Interrupted(f"rows so far are in {table.path}; continue with: {hint}") from None
    finally:
        bar.close()
        table.close()
        skipped.close()
    return stats


def _report_masks(masks: dict[str, int], out: Path) -> None:
    """Say which mask folders of the input folders were left out (count and names; all in the meta)."""
    if not masks:
        return
    print(f"left out {sum(masks.values())} mask file(s) in {len(masks)} mask folder(s) (a dataset's lung and "
          f"infection masks, not X-rays; all listed in {sidecar(out, 'meta.json')}; a file passed by its own "
          f"path is scored):", file=sys.stderr)
    for folder, count in list(masks.items())[:SHOW_BAD]:
        print(f"  - {folder} ({count} files)", file=sys.stderr)
    if len(masks) > SHOW_BAD:
        print(f"  - ... and {len(masks) - SHOW_BAD} more folder(s)", file=sys.stderr)


def _lung_mask(folder: Path | None, path: str) -> str:
    if folder is None:
        return ""
    return next((str(c) for c in (folder / Path(path).name, folder / (Path(path).stem + ".png")) if c.exists()), "")


def _report(args, out: Path, meta: dict, stats: dict, old_rows: int, old_bad: int, scorer: Scorer) -> None:
    """The first rows and the totals on stdout; the skipped inputs (count, first few) on stderr."""
    if stats["preview"] and not args.quiet:
        show = pd.DataFrame(stats["preview"]).drop(columns=["mask_path"], errors="ignore")
        show["path"] = [Path(p).name for p in show["path"]]
        print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    labels = ", ".join(f"{c} {stats['labels'][c]}" for c in scorer.classes if stats["labels"][c])
    print(f"wrote {out} ({meta['rows']} rows" + (f", {old_rows} of them from the earlier run" if old_rows else "")
          + (f"; this run: {labels}" if labels else "") + ")"
          + (f"; Grad-CAM figures in {scorer.cam_dir}" if scorer.cam_dir else "")
          + (f"; masks in {scorer.mask_dir}" if scorer.mask_dir else ""))
    if meta["skipped"]:
        print(f"{meta['skipped']} input(s) missing or unreadable" + (f" ({old_bad} in the earlier run)" if old_bad else "")
              + f", all listed in {sidecar(out, 'skipped.csv')}:", file=sys.stderr)
        for b in stats["first_bad"]:
            print(f"  - {b['path']}: {b['reason']}", file=sys.stderr)


_predict = cli.entry(build_parser, run)
_merge = cli.entry(build_merge_parser, run_merge, keras_needed=False)


def main(argv: list[str] | None = None) -> int:
    """``predict [options] INPUT...`` or ``predict merge SHARD_OUT... --out ALL``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return _merge(argv[1:]) if argv[:1] == ["merge"] else _predict(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Score X-ray files with a trained model, at archive scale.

    python -m covidcxr.predict --model PATH INPUT... [--out predictions.csv] [options]
    python -m covidcxr.predict merge SHARD_OUT... --out ALL.csv

PATH: a run or export folder, a ``.keras`` file or a SavedModel folder (``--prefer savedmodel``
uses an export's SavedModel instead of its model.keras). INPUTs: image files and folders (searched
recursively), taken in sorted path order. ``--workers`` threads decode a few batches ahead of the
model, which runs once per ``--batch-size`` batch (covidcxr/inference.py); each finished batch is
appended to the output and flushed, so memory does not grow with the number of files.

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
trained with ``--lung-crop given``. Exit codes: 0; 1 inputs skipped; 2 usage error; 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import heapq
import json
import re
import shlex
import shutil
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np

from covidcxr import cli
from covidcxr.artifacts import CALIBRATION, EXPORT_MODEL, atomic_write_text
from covidcxr.errors import ConfigError, DataError, RunExistsError

SKIP_COLUMNS = ["path", "reason"]
MASK_COLUMNS = ["mask_path", "mask_fraction", "height", "width"]
SHOW_BAD = 5          # skipped inputs named on stderr; all of them are in <out>.skipped.csv
PREVIEW = 10          # rows echoed on stdout at the end
CHUNK = 4096          # rows per write when merging
ROW_GROUP = 65536     # rows per row group of a joined parquet file


# ------------------------------------------------------------------ inputs and shards

def input_list(inputs: list[str]) -> tuple[list[str], dict[str, str]]:
    """(every input path, sorted and unique; {path: reason} for those already known bad). Folders give
    their image files (recursive); a missing path or an empty folder is an entry of its own, so that it
    is listed as skipped by the one shard it falls in."""
    from covidcxr.data.imageio import is_image_file

    entries, bad = set(), {}
    for arg in inputs:
        p = Path(arg)
        found = {str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f)} if p.is_dir() else set()
        entries |= found or {str(p)}
        if not p.exists() or (p.is_dir() and not found):
            bad[str(p)] = "no such file or folder" if not p.exists() else "folder holds no image files"
    return sorted(entries), bad


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' with 1 <= K <= N -> (K, N); None -> (1, 1)."""
    m = re.fullmatch(r"(\d+)/(\d+)", (text or "1/1").strip())
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise ConfigError(f"--shard {text}: expected K/N with 1 <= K <= N (shards count from 1), e.g. --shard 1/4.")
    return int(m[1]), int(m[2])


def in_shard(path: str, k: int, n: int) -> bool:
    """Whether ``path`` is in shard K of N: the sha1 of the path string (UTF-8), as a number, modulo N is
    K - 1; the same on every machine and in every run."""
    return int(hashlib.sha1(path.encode()).hexdigest(), 16) % n == k - 1


def list_digest(paths) -> str:
    """sha256 of the sorted path strings, one per line: names an input list in the sidecar."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------ output tables

class CsvTable:
    """Rows appended to a CSV and flushed per write; ``repair`` cuts a partial last line (a kill mid-write)."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns, self._file = Path(path), list(columns), None

    def repair(self) -> None:
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        with open(self.path, "rb+") as f:
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
            f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)

    def rows(self):
        """The rows written so far, as dicts of strings (exactly as written)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header not in (None, self.columns):
                raise DataError(f"{self.path}: columns {header}, expected {self.columns}.")
            for values in reader:
                yield dict(zip(self.columns, values))

    def write(self, rows: list[dict]) -> None:
        """Append ``rows`` (the header first, into a new or empty file) and flush."""
        if self._file is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="")
            self._writer = csv.writer(self._file)
            if fresh:
                self._writer.writerow(self.columns)
        self._writer.writerows([[r[c] for c in self.columns] for r in rows])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    finish = close


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("--format parquet needs pyarrow: pip install pyarrow (or use --format csv).") from exc
    return pa, pq


class ParquetTable:
    """Rows as parquet: one closed file per write under ``<out>.parts/`` (written under a temporary
    name, so a kill leaves no partial part), joined into ``<out>`` by ``finish``."""

    def __init__(self, path: Path, columns: list[str]):
        pa, _ = _pyarrow()
        self.path, self.columns = Path(path), list(columns)
        self.parts, self._next = self.path.with_name(self.path.name + ".parts"), None
        kinds = {"path": pa.string(), "label": pa.string(), "mask_path": pa.string(), "height": pa.int64(),
                 "width": pa.int64()}
        self.schema = pa.schema([(c, kinds.get(c, pa.float64())) for c in self.columns])

    def repair(self) -> None:
        """Back to parts: a joined ``<out>`` becomes part 0 again (its parts were all in it); drop temporaries."""
        if self.path.exists():
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts.mkdir()
            self.path.rename(self.parts / f"{0:09d}.parquet")
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()

    def _files(self) -> list[Path]:
        if self.path.exists():
            return [self.path]
        return sorted(self.parts.glob("*.parquet")) if self.parts.is_dir() else []

    def rows(self):
        """The rows written so far, as dicts, row group by row group."""
        _, pq = _pyarrow()
        for f in self._files():
            pf = pq.ParquetFile(f)
            if pf.schema_arrow.names != self.columns:
                raise DataError(f"{f}: columns {pf.schema_arrow.names}, expected {self.columns}.")
            for i in range(pf.num_row_groups):
                yield from pf.read_row_group(i).to_pylist()

    def write(self, rows: list[dict]) -> None:
        """``rows`` as the next part file."""
        if not rows:
            return
        pa, pq = _pyarrow()
        if self._next is None:
            self.parts.mkdir(exist_ok=True)
            self._next = max((int(p.stem) for p in self.parts.glob("*.parquet")), default=-1) + 1
        dest, self._next = self.parts / f"{self._next:09d}.parquet", self._next + 1
        pq.write_table(pa.Table.from_pylist(rows, self.schema), dest.with_suffix(".tmp"))
        dest.with_suffix(".tmp").replace(dest)

    def close(self) -> None:
        pass

    def finish(self) -> None:
        """Join the parts into ``<out>`` (row groups of up to ROW_GROUP rows, a few parts in memory at a time)."""
        pa, pq = _pyarrow()
        if self.path.exists() and not self.parts.is_dir():
            return
        tmp, pending = self.path.with_name(self.path.name + ".tmp"), []
        with pq.ParquetWriter(tmp, self.schema) as writer:
            for f in self._files():
                pending.append(pq.read_table(f, schema=self.schema))
                if sum(t.num_rows for t in pending) >= ROW_GROUP:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
                    pending = []
            writer.write_table(pa.concat_tables(pending) if pending else self.schema.empty_table())
        tmp.replace(self.path)
        shutil.rmtree(self.parts, ignore_errors=True)


def open_table(path: Path, columns: list[str], fmt: str):
    return (ParquetTable if fmt == "parquet" else CsvTable)(path, columns)


def sidecar(out: Path, name: str) -> Path:
    """``<out>.meta.json`` / ``<out>.skipped.csv`` / ``<out>.parts``."""
    return out.with_name(f"{out.name}.{name}")


def read_meta(out: Path) -> dict:
    path = sidecar(out, "meta.json")
    if not path.exists():
        raise DataError(f"{out}: no {path.name} beside it; not an output of this covidcxr.predict.")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the model and its identity

def model_identity(pred, model_arg: str) -> dict:
    """Path, kind, classes, task and a sha256 over the files the model was loaded from (model.keras and
    its lung segmenter's, or every file of the SavedModel): what --resume and merge compare."""
    loc = pred.located
    if pred.kind == "keras":
        files = [loc.keras_path] + ([loc.segmenter_dir / EXPORT_MODEL] if pred.segmenter is not None else [])
    else:
        files = sorted(f for f in loc.savedmodel_path.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return {"path": str(model_arg), "kind": pred.kind, "sha256": h.hexdigest(), "classes": pred.classes,
            "task": pred.card.task}


def _describe(m: dict) -> str:
    return f"{m['path']} ({m['kind']}, sha256 {m['sha256'][:12]}, {m['task']}: {', '.join(m['classes'])})"


def _mismatch(old: dict, new: dict, keys: tuple) -> str:
    """'' when two sidecars are of one model (same files, classes, task) and agree on ``keys``; else
    'KEY OLD, not NEW' in words."""
    same = all(old["model"][k] == new["model"][k] for k in ("sha256", "kind", "classes", "task"))
    key = "model" if not same else next((k for k in keys if old.get(k) != new.get(k)), "")
    show = _describe if key == "model" else str
    return key and f"{key} {show(old.get(key))}, not {show(new.get(key))}"


def _check_flags(args, pred) -> None:
    """Refuse a flag that does not apply to this model (its task, its kind, its lung crop)."""
    task, crop = pred.card.task, pred.card.lung_crop
    rules = [(args.masks and task == "classify", "--masks is for segmentation and multi-task models"),
             (args.calibrated and task == "segment", "--calibrated scales class probabilities"),
             (args.gradcam and task != "classify", "--gradcam draws class heatmaps of classifiers"),
             (args.gradcam and pred.kind != "keras", "--gradcam needs the Keras model: pass the run or export "
                                                     "folder (not the bare SavedModel) and --prefer keras"),
             (args.gradcam_layer and not args.gradcam, "--gradcam-layer needs --gradcam"),
             (args.lung_masks and crop != "given", "--lung-masks is for classifiers trained with --lung-crop given"),
             (crop == "given" and not args.lung_masks, "this classifier was trained on lung-cropped images "
                                                       "(--lung-crop given): pass --lung-masks DIR, each input's "
                                                       "lung mask under its file name")]
    for broken, why in rules:
        if broken:
            raise ConfigError(f"{why}; --model {args.model} is a {task} model ({pred.kind}"
                              f"{', lung crop ' + crop if crop else ''}).")


def _temperature(args, pred) -> float:
    """The temperature of ``--calibration FILE`` or of the calibration.json beside the model."""
    from covidcxr.calibration import load_temperature

    home = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    cands = [Path(args.calibration)] if args.calibration else \
        [d / CALIBRATION for d in dict.fromkeys((home, pred.located.root, home.parent, home.parent.parent))]
    path = next((c for c in cands if c.exists()), None)
    if path is None:
        raise ConfigError(f"--calibrated: {' / '.join(map(str, cands))} not found. Run python -m covidcxr.evaluate "
                          f"on this model first (it fits the temperature on the validation split), or pass "
                          f"--calibration FILE.")
    try:
        t = load_temperature(path)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--calibrated: {path} is not a calibration file ({exc}).") from exc
    print(f"calibrated: temperature {t:.4f} from {path}")
    return t


# ------------------------------------------------------------------ batches -> rows, masks, Grad-CAM

class Scorer:
    """Turns each finished ``inference.Batch`` into output rows, writing its mask PNGs and Grad-CAM
    figures on the way (one model call and one Grad-CAM pass per batch). ``dupes``: file stems that
    occur more than once in the whole input list; those files get the path's sha1 in their names, so
    names are unique and the same in every shard and on resume."""

    def __init__(self, classes, temperature=None, mask_dir=None, cam=None, cam_dir=None, dupes=frozenset()):
        self.classes, self.temperature, self.mask_dir = list(classes), temperature, mask_dir
        self.cam, self.cam_dir, self.dupes = cam, cam_dir, dupes

    def name(self, path: str, kind: str, folder: Path) -> Path:
        stem = Path(path).stem
        stem += "_" + hashlib.sha1(path.encode()).hexdigest()[:8] if stem in self.dupes else ""
        return folder / f"{stem}_{kind}.png"

    def rows(self, batch) -> list[dict]:
        from covidcxr.calibration import apply_temperature

        rows = [{"path": d.item.path} for d in batch.done]
        if batch.probs is not None:
            probs = batch.probs if self.temperature is None else apply_temperature(batch.probs, self.temperature)
            for row, p in zip(rows, probs):
                row["label"] = self.classes[int(np.argmax(p))]
                row.update({f"prob_{c}": float(v) for c, v in zip(self.classes, p)})
        if self.mask_dir is not None:
            for row, d, m in zip(rows, batch.done, batch.masks):
                self._mask(row, d, m)
        if self.cam is not None and batch.done:
            self._cams(batch, rows)
        return rows

    def _mask(self, row: dict, d, probs: np.ndarray) -> None:
        from covidcxr.data.preprocess import mask_from_probs
        from covidcxr.masks import save_png

        mask = mask_from_probs(probs, d.height, d.width)
        dest = save_png(mask, self.name(d.item.path, "mask", self.mask_dir))
        row.update(mask_path=str(dest), mask_fraction=float(mask.mean()), height=int(d.height), width=int(d.width))

    def _cams(self, batch, rows: list[dict]) -> None:
        from covidcxr.gradcam import render_cam

        res = self.cam.explain(batch.x)
        for i, (d, row) in enumerate(zip(batch.done, rows)):
            title = [f"predicted {row['label']} ({row['prob_' + row['label']]:.2f})", Path(d.item.path).name]
            render_cam(d.gray, res.heatmaps[i], self.name(d.item.path, "gradcam", self.cam_dir), title, res.note(i))


# ------------------------------------------------------------------ the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, export folder, .keras file or SavedModel folder")
    p.add_argument("inputs", nargs="+", help="image files or folders (an input named 'merge' first: ./merge)")
    p.add_argument("--out", default=None, help="output file (default predictions.csv / predictions.parquet)")
    p.add_argument("--format", choices=("csv", "parquet"), default=None, help="default: from the --out suffix")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU cores, at most 8)")
    p.add_argument("--prefer", choices=("keras", "savedmodel"), default="keras",
                   help="which model of a folder holding both to run (default keras)")
    p.add_argument("--shard", default=None, metavar="K/N", help="score shard K (1..N) of N of the inputs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted output (same command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when inputs were missing or unreadable")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no preview table")
    p.add_argument("--calibrated", action="store_true", help="apply the temperature fitted by covidcxr.evaluate")
    p.add_argument("--calibration", default=None, metavar="FILE", help="calibration.json to use (implies --calibrated)")
    p.add_argument("--gradcam", default=None, metavar="DIR", help="write a Grad-CAM figure per input into DIR")
    p.add_argument("--gradcam-layer", default=None, help="layer inside the backbone (default: its last block)")
    p.add_argument("--masks", default=None, metavar="DIR", help="segmentation/multi-task: folder for the mask PNGs")
    p.add_argument("--lung-masks", default=None, metavar="DIR",
                   help="classifiers trained with --lung-crop given: each input's lung mask, same file name")
    return p


def _out_and_format(args) -> tuple[Path, str]:
    fmt = args.format or ("parquet" if args.out and Path(args.out).suffix.lower() in (".parquet", ".pq") else "csv")
    if fmt == "parquet":
        _pyarrow()
    return Path(args.out or f"predictions.{fmt}"), fmt


def _existing(out: Path) -> list[Path]:
    return [p for p in (out, sidecar(out, "meta.json"), sidecar(out, "parts")) if p.exists()]


def _check_free(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an existing output unless --resume or --overwrite says what to do with it."""
    if resume and overwrite:
        raise ConfigError("--resume keeps the existing output and --overwrite replaces it; pass one of them.")
    if _existing(out) and not (resume or overwrite):
        raise RunExistsError(f"{_existing(out)[0]} already exists; pass --resume to continue it, --overwrite or "
                             f"another --out.")


def _remove(out: Path) -> None:
    for p in _existing(out) + [sidecar(out, "skipped.csv")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _folder(path: str, flag: str, args) -> Path:
    d = Path(path)
    if d.is_dir() and any(d.iterdir()) and not (args.overwrite or args.resume):
        raise RunExistsError(f"{flag} {d} already holds files; pass --overwrite, --resume or another folder.")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _scorer(args, pred, out: Path, entries: list[str]) -> Scorer:
    """The Scorer of this command: temperature, mask and Grad-CAM folders, the file stems used twice."""
    temperature = _temperature(args, pred) if args.calibrated else None
    mask_dir = cam = cam_dir = None
    if pred.card.task != "classify":
        mask_dir = _folder(args.masks or str(out.with_name(out.stem + "_masks")), "--masks", args)
    if args.gradcam:
        from covidcxr.gradcam import GradCAM

        cam, cam_dir = GradCAM(pred.model, args.gradcam_layer), _folder(args.gradcam, "--gradcam", args)
    dupes = {s for s, c in Counter(Path(p).stem for p in entries).items() if c > 1}
    return Scorer(pred.classes, temperature, mask_dir, cam, cam_dir, dupes)


def _resume(out: Path, tables, meta: dict) -> list[list[str]]:
    """The paths each table already holds, after checking the output is of this model and input list."""
    why = _mismatch(read_meta(out), meta, ("calibration", "format", "columns", "shard", "inputs"))
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
    from covidcxr.inference import Predictor

    k, n = parse_shard(args.shard)
    args.calibrated = args.calibrated or bool(args.calibration)
    out, fmt = _out_and_format(args)
    _check_free(out, args.resume, args.overwrite)
    if args.batch_size < 1 or (args.workers or 1) < 1:
        raise ConfigError(f"--batch-size {args.batch_size} / --workers {args.workers}: must be at least 1.")
    pred = Predictor(args.model, args.batch_size, args.workers, args.prefer)
    _check_flags(args, pred)
    entries, bad = input_list(args.inputs)
    mine = [p for p in entries if in_shard(p, k, n)]
    scorer = _scorer(args, pred, out, entries)
    columns = ["path"] + (["label"] + [f"prob_{c}" for c in pred.classes] if pred.card.task != "segment" else []) \
        + (MASK_COLUMNS if pred.card.task != "classify" else [])
    meta = {"model": model_identity(pred, args.model), "calibration": scorer.temperature, "format": fmt,
            "columns": columns, "shard": [k, n], "inputs": {"count": len(entries), "sha256": list_digest(entries)},
            "shard_count": len(mine), "rows": 0, "skipped": 0, "complete": False}
    table, skipped = open_table(out, columns, fmt), CsvTable(sidecar(out, "skipped.csv"), SKIP_COLUMNS)
    if args.overwrite:
        _remove(out)
    done = _resume(out, (table, skipped), meta) if args.resume and _existing(out) else [[], []]
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


def _score(args, pred, scorer: Scorer, tables, todo: list[str], bad: dict) -> dict:
    """Run the model over ``todo``, appending each batch's rows and failures as it finishes; returns
    counts, the first few failures and rows (memory stays flat however many files there are)."""
    from tqdm import tqdm

    from covidcxr.inference import Item

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


def _lung_mask(folder: Path | None, path: str) -> str:
    if folder is None:
        return ""
    return next((str(c) for c in (folder / Path(path).name, folder / (Path(path).stem + ".png")) if c.exists()), "")


def _report(args, out: Path, meta: dict, stats: dict, old_rows: int, old_bad: int, scorer: Scorer) -> None:
    """The first rows and the totals on stdout; the skipped inputs (count, first few) on stderr."""
    if stats["preview"] and not args.quiet:
        import pandas as pd

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


# ------------------------------------------------------------------ merge

def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.predict merge",
                                description="Join the outputs of all N '--shard K/N' runs of one model over one "
                                            "input list into one output, with its .skipped.csv and .meta.json, "
                                            "after checking that every shard is there and complete and that "
                                            "every input is in exactly one of them.")
    p.add_argument("outputs", nargs="+", help="the shards' outputs (their .meta.json beside them)")
    p.add_argument("--out", required=True, help="the merged output")
    p.add_argument("--overwrite", action="store_true")
    return p


def _shards(paths: list[Path]) -> list[tuple[Path, dict]]:
    """(output, meta) of every shard, in shard order, after checking they are one complete set."""
    shards = [(p, read_meta(p)) for p in paths]
    p0, m0 = shards[0]
    n, ks = m0["shard"][1], Counter(m["shard"][0] for _, m in shards)
    for p, m in shards:
        why = _mismatch(m, m0, ("calibration", "format", "columns", "inputs")) or \
            (m["shard"][1] != n and f"N {m['shard'][1]}, not {n}")
        if why:
            raise DataError(f"merge: {p} was written with {why} (as {p0}); they are not shards of one run.")
        if not m["complete"]:
            raise DataError(f"merge: {p} (shard {m['shard'][0]}/{n}) is incomplete; finish it with --resume first.")
    if any(c > 1 for c in ks.values()):
        raise DataError(f"merge: shard {', '.join(f'{k}/{n}' for k, c in ks.items() if c > 1)} given twice.")
    if len(ks) != n:
        raise DataError(f"merge: missing shard(s) {', '.join(f'{k}/{n}' for k in range(1, n + 1) if k not in ks)} "
                        f"of {n}.")
    return sorted(shards, key=lambda s: s[1]["shard"][0])


def _tables(out: Path, meta: dict):
    return open_table(out, meta["columns"], meta["format"]), CsvTable(sidecar(out, "skipped.csv"), SKIP_COLUMNS)


def _check_cover(shards: list[tuple[Path, dict]]) -> None:
    """Every input of the list in exactly one shard, as a row or as skipped, and each shard as its meta says."""
    seen: set[str] = set()
    counts = {}
    for p, m in shards:
        for t in _tables(p, m):
            for row in t.rows():
                if row["path"] in seen:
                    raise DataError(f"merge: {row['path']} is scored twice (again in {t.path}).")
                seen.add(row["path"])
                counts[t.path] = counts.get(t.path, 0) + 1
    for p, m in shards:
        held = [counts.get(t.path, 0) for t in _tables(p, m)]
        if held != [m["rows"], m["skipped"]]:
            raise DataError(f"merge: {p} holds {held[0]} rows and {held[1]} skipped, its meta says "
                            f"{m['rows']} and {m['skipped']}; it was changed after its run.")
    inputs = shards[0][1]["inputs"]
    if len(seen) != inputs["count"] or list_digest(seen) != inputs["sha256"]:
        raise DataError(f"merge: the shards hold {len(seen)} inputs, not the {inputs['count']} of their input list; "
                        f"some file is missing.")


def run_merge(args) -> int:
    """Check the shards, then stream their rows (and skipped inputs) into one output in path order."""
    out = Path(args.out)
    _check_free(out, False, args.overwrite)
    shards = _shards([Path(o) for o in args.outputs])
    _check_cover(shards)
    if args.overwrite:
        _remove(out)
    merged = _tables(out, shards[0][1])
    out.parent.mkdir(parents=True, exist_ok=True)
    merged[0].write([])
    for i, dest in enumerate(merged):  # each shard is in path order: so is the merge, as one run would be
        rows = heapq.merge(*(_tables(p, m)[i].rows() for p, m in shards), key=lambda r: r["path"])
        while chunk := list(islice(rows, CHUNK)):
            dest.write(chunk)
    for t in merged:
        t.finish()
    meta = {**shards[0][1], "shard": [1, 1], "shard_count": shards[0][1]["inputs"]["count"], "complete": True,
            "rows": sum(m["rows"] for _, m in shards), "skipped": sum(m["skipped"] for _, m in shards),
            "merged_from": [str(p) for p, _ in shards]}
    atomic_write_text(sidecar(out, "meta.json"), json.dumps(meta, indent=2))
    print(f"merged {len(shards)} shards into {out} ({meta['rows']} rows, {meta['skipped']} skipped)")
    return 0


_predict = cli.entry(build_parser, run)
_merge = cli.entry(build_merge_parser, run_merge, keras_needed=False)


def main(argv: list[str] | None = None) -> int:
    """``predict [options] INPUT...`` or ``predict merge SHARD_OUT... --out ALL``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return _merge(argv[1:]) if argv[:1] == ["merge"] else _predict(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""predict's output files: the table (CSV appended per batch, or Parquet parts joined at the end),
its sidecars (``<out>.skipped.csv``, ``<out>.meta.json``), and the checks that keep an existing
output from being overwritten or resumed by another model."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

from covidcxr.artifacts import EXPORT_MODEL, Located, LungCrop
from covidcxr.errors import ConfigError, DataError, RunExistsError
from covidcxr.inference import ModelFile

SKIP_COLUMNS = ["path", "reason"]
MASK_COLUMNS = ["mask_path", "mask_fraction", "height", "width"]
CHUNK = 4096          # rows per write when merging
ROW_GROUP = 65536     # rows per row group of a joined parquet file


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


def pyarrow_module():
    try:
        import pyarrow as pa  # optional: only --format parquet needs it
        import pyarrow.parquet as pq  # optional: only --format parquet needs it
    except ImportError as exc:
        raise ConfigError("--format parquet needs pyarrow: pip install pyarrow (or use --format csv).") from exc
    return pa, pq


class ParquetTable:
    """Rows as parquet: one closed file per write under ``<out>.parts/`` (written under a temporary
    name, so a kill leaves no partial part), joined into ``<out>`` by ``finish``."""

    def __init__(self, path: Path, columns: list[str]):
        pa, _ = pyarrow_module()
        self.path, self.columns = Path(path), list(columns)
        self.parts, self._next = self.path.with_name(self.path.name + ".parts"), None
        kinds = {"path": pa.string(), "label": pa.string(), "mask_path": pa.string(), "height": pa.int64(),
                 "width": pa.int64()}
        self.schema = pa.schema([(c, kinds.get(c, pa.int64() if c.startswith("flag_") else pa.float64()))
                                 for c in self.columns])

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
        _, pq = pyarrow_module()
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
        pa, pq = pyarrow_module()
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
        pa, pq = pyarrow_module()
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


def model_identity(loc: Located, kind: ModelFile, model_arg: str) -> dict:
    """Path, kind, classes, task and a sha256 over the files the model is loaded from (model.keras or
    model.onnx and its lung segmenter's, or every file of the SavedModel): what --resume and merge compare."""
    seg = [loc.segmenter_dir / (EXPORT_MODEL if kind is ModelFile.KERAS else "model.onnx")] \
        if loc.card.lung_crop is LungCrop.MODEL and kind is not ModelFile.SAVEDMODEL and loc.segmenter_dir else []
    if kind in (ModelFile.KERAS, ModelFile.ONNX):
        files = [loc.keras_path if kind is ModelFile.KERAS else loc.onnx_path] + seg
    else:
        files = sorted(f for f in loc.savedmodel_path.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return {"path": str(model_arg), "kind": str(kind), "sha256": h.hexdigest(), "classes": list(loc.card.classes),
            "task": loc.card.task}


def describe_model(m: dict) -> str:
    return f"{m['path']} ({m['kind']}, sha256 {m['sha256'][:12]}, {m['task']}: {', '.join(m['classes'])})"


def mismatch(old: dict, new: dict, keys: tuple) -> str:
    """'' when two sidecars are of one model (same files, classes, task) and agree on ``keys``; else
    'KEY OLD, not NEW' in words."""
    same = all(old["model"][k] == new["model"][k] for k in ("sha256", "kind", "classes", "task"))
    key = "model" if not same else next((k for k in keys if old.get(k) != new.get(k)), "")
    show = describe_model if key == "model" else str
    return key and f"{key} {show(old.get(key))}, not {show(new.get(key))}"


def existing(out: Path) -> list[Path]:
    return [p for p in (out, sidecar(out, "meta.json"), sidecar(out, "parts")) if p.exists()]


def check_table_free(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an existing output unless --resume or --overwrite says what to do with it."""
    if resume and overwrite:
        raise ConfigError("--resume keeps the existing output and --overwrite replaces it; pass one of them.")
    if existing(out) and not (resume or overwrite):
        raise RunExistsError(f"{existing(out)[0]} already exists; pass --resume to continue it, --overwrite or "
                             f"another --out.")


def remove(out: Path) -> None:
    for p in existing(out) + [sidecar(out, "skipped.csv")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

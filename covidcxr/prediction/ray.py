"""Scoring on Ray Data: a callable class that ``Dataset.map_batches`` runs in a pool of actors, and the
driver that builds the dataset of paths and streams the rows into one Parquet file.

    import ray
    from covidcxr.prediction.ray import RayScorer, output_schema
    ds = ray.data.from_items([{"path": p} for p in paths])          # or read_binary_files(..., include_paths=True)
    rows = ds.map_batches(RayScorer, fn_constructor_kwargs={"model": "runs/x"}, batch_size=32,
                          compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_format="numpy")

Each actor loads the model once (``inference.Predictor``, the predictor of ``predict``) and turns a batch
of paths, or of file bytes with their paths (a ``bytes`` column), into the columns ``predict`` writes
(``prediction/scoring.py``: the same row builder), plus ``error``: '' for a scored file, else why it could
not be read (a missing or corrupt file is a row, never a failed task). Paths that are URIs
(``s3://``, ``gs://``, ``hdfs://``...) are read through ``pyarrow``'s filesystems inside the actor.
Retries, back-pressure, autoscaling and GPU packing are Ray's.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from covidcxr.errors import ConfigError
from covidcxr.inference import Item, ModelFile, Predictor
from covidcxr.prediction.outputs import MASK_COLUMNS
from covidcxr.prediction.scoring import Scorer
from covidcxr.prediction.shards import is_uri

ERROR = "error"
PATHS_PER_BLOCK = 256    # paths per input block: enough blocks to keep every actor busy, few enough to start fast


def ray_module():
    try:
        import ray  # optional extra [ray]: only --engine ray needs it
        import ray.data  # noqa: F401  (Ray Data ships with ray[data])
    except ImportError as exc:
        raise ConfigError("--engine ray needs Ray Data: pip install \"covidcxr[ray]\".") from exc
    return ray


def read_uri(uri: str) -> bytes:
    """The bytes of ``uri`` through ``pyarrow.fs`` (credentials as pyarrow finds them)."""
    from pyarrow import fs  # a dependency of covidcxr; only URIs need its filesystems

    filesystem, where = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(where) as f:
        return f.read()


def output_columns(pred: Predictor, op: dict | None) -> list[str]:
    """predict's columns for this model (and operating point), then ``error``."""
    return pred.task.output_columns(pred.classes, MASK_COLUMNS) + ([op["column"]] if op else []) + [ERROR]


def output_schema(columns: list[str]):
    """The Arrow schema of the rows: floats as float64, sizes and flags as int64 (null on error rows)."""
    import pyarrow as pa  # a dependency of covidcxr (the Parquet output)

    def kind(c):
        if c.startswith("prob_") or c == "mask_fraction":
            return pa.float64()
        if c in ("height", "width") or c.startswith("flag_"):
            return pa.int64()
        return pa.string()

    return pa.schema([(c, kind(c)) for c in columns])


class RayScorer:
    """The Ray Data callable class: one model per actor, ``__call__`` on a batch of paths (and bytes).

    ``temperature`` / ``operating_point``: as ``predict --calibrated`` / ``--operating-point`` resolve them
    (the driver resolves them once and passes the values). ``mask_dir``: where segmenters write their mask
    PNGs (a folder every actor can write to; without one ``mask_path`` is empty and ``mask_fraction``,
    ``height`` and ``width`` are still filled); ``dupes``: file stems used more than once (their mask names
    get the path's sha1). ``known_bad``: {path: reason} the driver already knows (a folder without images)."""

    def __init__(self, model: str, batch_size: int = 32, workers: int | None = None, engine: str = "keras",
                 temperature: float | None = None, operating_point: dict | None = None, mask_dir: str | None = None,
                 dupes=frozenset(), known_bad: dict[str, str] | None = None):
        self.pred = Predictor(model, batch_size, workers, ModelFile(engine))
        if self.pred.needs_lung_masks:
            raise ConfigError(f"{model}: a classifier trained on given lung crops needs each input's lung mask; "
                              f"Ray scoring does not take --lung-masks: use plain predict.")
        folder = Path(mask_dir) if mask_dir and self.pred.task.segments else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.scorer = Scorer(self.pred.classes, temperature, folder, dupes=frozenset(dupes), op=operating_point,
                             segments=self.pred.task.segments)
        self.known_bad = dict(known_bad or {})
        self.columns = output_columns(self.pred, operating_point)
        self.schema = output_schema(self.columns)

    def _items(self, paths, data) -> tuple[list[Item], dict[int, str]]:
        items, errors = [], {}
        for i, p in enumerate(paths):
            if p in self.known_bad:
                errors[i] = self.known_bad[p]
                continue
            raw = None if data is None else bytes(data[i])
            if raw is None and is_uri(p):
                try:
                    raw = read_uri(p)
                except Exception as exc:  # a missing object, no credentials: this row only
                    errors[i] = f"cannot read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
                    continue
            items.append(Item(p, key=i, data=raw))
        return items, errors

    def __call__(self, batch: dict) -> "object":
        """A batch ``{"path": [...], "bytes": [...] (optional)}`` -> a pyarrow Table of this batch's rows, in
        its order, one per input."""
        import pyarrow as pa  # a dependency of covidcxr (the Parquet output)

        paths = [str(p) for p in batch["path"]]
        items, errors = self._items(paths, batch.get("bytes"))
        rows: dict[int, dict] = {}
        for out in self.pred.run(items):
            for d, row in zip(out.done, self.scorer.rows(out)):
                rows[d.item.key] = row
            errors.update({d.item.key: d.reason for d in out.failed})
        table = {c: [] for c in self.columns}
        for i, p in enumerate(paths):
            row = rows.get(i, {"path": p})
            row[ERROR] = errors.get(i, "")
            for c in self.columns:
                table[c].append(row.get(c))
        return pa.Table.from_pydict(table, schema=self.schema)


@dataclass
class Cluster:
    """Where the actors run: ``address`` (None: a local Ray started here; 'auto': the running cluster),
    ``actors``, ``gpus`` per actor and ``cpus`` per actor."""

    address: str | None = None
    actors: int = 1
    gpus: float = 0.0
    cpus: float = 1.0


def connect(cluster: Cluster) -> tuple[object, dict[str, str]]:
    """``ray.init`` (local or ``--address``), with this process's Keras backend and the actors' thread pool
    sizes in the job's environment, so the actors can take the workers Ray prestarts for the job. Returns
    ray and the environment the actors still need on their own (when a caller had started Ray already)."""
    ray = ray_module()
    threads = actor_threads(cluster)
    if ray.is_initialized():
        return ray, threads
    env = {"KERAS_BACKEND": keras.backend.backend(), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
           **threads}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False,
             include_dashboard=False, configure_logging=False)
    return ray, {}


def dataset(ray, paths: list[str], batch_size: int, cluster: Cluster, scorer_kwargs: dict, progress: bool = True,
            actor_env: dict[str, str] | None = None):
    """The dataset of scored rows, in ``paths`` order. ``actor_env``: environment variables for the actors
    beyond the job's (a per-actor runtime_env makes Ray start new worker processes for them)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True      # rows in input order: the order plain predict writes
    ctx.enable_progress_bars = progress
    blocks = max(1, min(len(paths), max(2 * cluster.actors, math.ceil(len(paths) / PATHS_PER_BLOCK))))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    extra = {"runtime_env": {"env_vars": actor_env}} if actor_env else {}
    return ds.map_batches(RayScorer, fn_constructor_kwargs=scorer_kwargs, batch_size=batch_size,
                          compute=ray.data.ActorPoolStrategy(size=cluster.actors), num_gpus=cluster.gpus or None,
                          num_cpus=cluster.cpus, batch_format="numpy", udf_modifying_row_count=False, **extra)


def actor_threads(cluster: Cluster) -> dict[str, str]:
    """TensorFlow's thread pools sized to the CPUs an actor reserves (unless set already): N actors on one
    machine then share its cores instead of each starting a pool as large as the machine."""
    n = str(max(1, math.ceil(cluster.cpus)))
    return {k: os.environ.get(k, v) for k, v in (("TF_NUM_INTRAOP_THREADS", n), ("TF_NUM_INTEROP_THREADS", "1"))}


def score(paths: list[str], out: Path, cluster: Cluster, scorer_kwargs: dict, columns: list[str],
          on_rows=None, progress: bool = True) -> dict:
    """Score ``paths`` on Ray into the Parquet file ``out`` (written to ``<out>.partial``, renamed when every
    row is in). ``on_rows(table)`` sees each block as it arrives. Returns rows, errors and seconds: in all,
    to join or start Ray (``init_s``), and until the first block of rows came back (``first_rows_s``: the
    actors' start-up and model load, and the first batches)."""
    import pyarrow.parquet as pq  # a dependency of covidcxr (the Parquet output)

    t0 = time.perf_counter()
    ray, actor_env = connect(cluster)
    stats = {"rows": 0, "errors": 0, "init_s": time.perf_counter() - t0, "first_rows_s": None}
    schema = output_schema(columns)
    partial = out.with_name(out.name + ".partial")
    rows = dataset(ray, paths, scorer_kwargs.get("batch_size", 32), cluster, scorer_kwargs, progress, actor_env)
    with pq.ParquetWriter(partial, schema) as writer:
        for block in rows.iter_batches(batch_format="pyarrow", batch_size=None):
            block = block.select(columns).cast(schema)
            writer.write_table(block)
            if stats["first_rows_s"] is None:
                stats["first_rows_s"] = time.perf_counter() - t0
            stats["rows"] += block.num_rows
            stats["errors"] += sum(1 for e in block.column(ERROR).to_pylist() if e)
            if on_rows is not None:
                on_rows(block)
    os.replace(partial, out)
    stats["seconds"] = time.perf_counter() - t0
    return stats

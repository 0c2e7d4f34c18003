"""Archive-scale prediction across machines: the sorted input list, ``--shard K/N`` (a stable hash of
each path), the list's digest, and ``predict merge``, which joins all N shards after checking that
every input is in exactly one of them."""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import re
from collections import Counter
from itertools import islice
from pathlib import Path

from covidcxr.artifacts import atomic_write_text
from covidcxr.data.layouts import walk_images
from covidcxr.errors import ConfigError, DataError
from covidcxr.prediction.outputs import (CHUNK, SKIP_COLUMNS, CsvTable, check_table_free, mismatch, open_table, read_meta,
                                         remove, sidecar)


def is_uri(path: str) -> bool:
    """A path with a scheme (s3://, gs://, hdfs://, file://...): read through pyarrow's filesystems."""
    return "://" in path


def read_input_list(source: str) -> list[str]:
    """``--inputs-from LIST``: one path per line (blank lines skipped, surrounding spaces kept off), from a
    local file or a URI that ``pyarrow``'s filesystems reach."""
    try:
        if is_uri(source):
            from pyarrow import fs  # a dependency of covidcxr; only a list on object storage needs its filesystems

            filesystem, where = fs.FileSystem.from_uri(source)
            with filesystem.open_input_stream(where) as f:
                text = f.read().decode("utf-8")
        else:
            text = Path(source).read_text(encoding="utf-8")
    except Exception as exc:  # missing, unreadable, no credentials, not UTF-8
        raise ConfigError(f"--inputs-from {source}: cannot read it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); pass a text file of paths, one "
                          f"per line.") from exc
    paths = [line.strip() for line in text.splitlines() if line.strip()]
    if not paths:
        raise ConfigError(f"--inputs-from {source}: the list holds no paths.")
    return paths


def input_list(inputs: list[str], uris: bool = False) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """(every input path, sorted and unique; {path: reason} for those already known bad; {mask folder:
    files} left out). Folders give their image files (recursive) except those in a dataset layout's
    mask folders (``<Class>/masks/``, ``lung masks/``, ``infection masks/`` beside ``images/``): they
    are listed as left out, and a mask passed by its own path is scored. A missing path or an empty
    folder is an entry of its own, so that it is listed as skipped by the one shard it falls in."""
    entries, bad, masks = set(), {}, {}
    for arg in inputs:
        if uris and is_uri(arg):
            entries.add(arg)
            continue
        p = Path(arg)
        found, left = walk_images(p) if p.is_dir() else ([], {})
        masks.update(left)
        entries |= {str(f) for f in found} or {str(p)}
        if not p.exists() or (p.is_dir() and not found):
            bad[str(p)] = "no such file or folder" if not p.exists() else "folder holds no image files" + (
                " outside its mask folders" if left else "")
    return sorted(entries), bad, dict(sorted(masks.items()))


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
        why = mismatch(m, m0, ("calibration", "operating_point", "format", "columns", "inputs")) or \
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
    check_table_free(out, False, args.overwrite)
    shards = _shards([Path(o) for o in args.outputs])
    _check_cover(shards)
    if args.overwrite:
        remove(out)
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

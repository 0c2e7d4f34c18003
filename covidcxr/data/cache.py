"""The decoded-input cache: every image (and mask) of a manifest decoded, contrast-enhanced
and resized **once** into memory-mapped uint8 arrays, reused across runs and backends.

    <cache dir>/<key>/images.u8        uint8 [N, S, S]  (lung-cropped when the spec says so)
    <cache dir>/<key>/mask-<column>.u8 uint8 [N, S, S]  {0, 1}
    <cache dir>/<key>/meta.json        rows, which decoded, why the others did not

The key hashes the preprocessing (size, contrast, crop, masks, decoder version) and every
row's files with their size and modification time, so a changed manifest, image or setting
builds a new cache. A build runs in worker processes into ``<key>.partial-*`` and is renamed
only when complete, so a concurrent or crashed run never reads a half-written cache; the disk
space is reserved before any pixel is written, so a full disk fails at once, cleanly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
import multiprocessing as mp
from pathlib import Path

import numpy as np
from tqdm import tqdm

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import THUMB_SIZE, inspect_file, read_mask
from covidcxr.data.pool import default_workers
from covidcxr.errors import DataError

VERSION = 4  # bump when decoding or preprocessing changes what is stored (4: the exact 16-bit-grid resize)
CHUNK = 16


@dataclass(frozen=True)
class CacheSpec:
    image_size: int
    contrast: str = "none"
    masks: tuple[str, ...] = ()     # manifest columns stored as masks (e.g. "lung_mask")
    crop: str = ""                  # manifest column whose mask multiplies the stored image


@dataclass
class InputCache:
    """An opened cache: arrays in manifest row order; ``ok[i]`` False where row i failed."""

    path: Path
    spec: CacheSpec
    images: np.ndarray
    masks: dict[str, np.ndarray]
    ok: np.ndarray
    reasons: list[str]
    has_mask: dict[str, np.ndarray] = field(default_factory=dict)
    built_seconds: float | None = None   # None: reused

    @property
    def failed(self) -> list[tuple[int, str]]:
        return [(i, r) for i, r in enumerate(self.reasons) if r]


def default_cache_dir() -> Path:
    env = os.environ.get("COVIDCXR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "covidcxr"


def _stat(path: str) -> list:
    if not path:
        return ["", 0, 0]
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [os.path.abspath(path), -1, -1]


def cache_key(rows: list[dict], spec: CacheSpec) -> str:
    cols = ["path", *spec.masks] + ([spec.crop] if spec.crop else [])
    h = hashlib.sha256(json.dumps({"v": VERSION, "spec": asdict(spec)}, sort_keys=True).encode())
    for r in rows:
        h.update(json.dumps([_stat(r.get(c, "")) for c in cols]).encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- one row (runs in workers)


def _load_row(row: dict, spec: CacheSpec):
    """(uint8 image [S, S], {column: uint8 mask}, '' or the reason it failed, fingerprint or None).
    The fingerprint (sha256, perceptual hashes, thumbnail) is what the training-overlap guard
    compares; it comes from the same single decode as the pixels."""
    s = spec.image_size
    info = inspect_file(row["path"], keep_gray=True)
    if not info.ok:
        return np.zeros((s, s), np.uint8), {}, f"{row['path']}: {info.reason}", None
    fp = (bytes.fromhex(info.sha256), info.phash, info.phash_mirror, info.thumb)
    try:
        img = P.prepare(info.gray, s, spec.contrast)
    except Exception as exc:  # one unusable file never stops the build
        return np.zeros((s, s), np.uint8), {}, f"{row['path']}: {_short(exc)}", fp
    masks = {}
    for col in spec.masks + ((spec.crop,) if spec.crop else ()):
        mpath = row.get(col, "")
        if mpath:
            try:
                masks[col] = P.resize_mask(read_mask(mpath), s)
            except Exception as exc:
                return img, {}, f"{mpath}: unreadable {col.replace('_', ' ')} ({_short(exc)})", fp
    if spec.crop:
        if spec.crop not in masks:
            return img, {}, f"{row['path']}: no crop mask ({spec.crop} is empty)", fp
        img = img * masks[spec.crop]
    return img, masks, "", fp


def _short(exc: Exception) -> str:
    text = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
    return (text or type(exc).__name__).splitlines()[0][:200]


def _write_chunk(folder: str, rows: list[tuple[int, dict]], spec: CacheSpec) -> list[tuple]:
    """Decode rows and write them at their offsets (pwrite: a full disk raises, never SIGBUS)."""
    s2 = spec.image_size ** 2
    fds = {"images": os.open(os.path.join(folder, "images.u8"), os.O_WRONLY)}
    for col in spec.masks:
        fds[col] = os.open(os.path.join(folder, f"mask-{col}.u8"), os.O_WRONLY)
    out = []
    try:
        for i, row in rows:
            img, masks, reason, fp = _load_row(row, spec)
            os.pwrite(fds["images"], np.ascontiguousarray(img).tobytes(), i * s2)
            for col in spec.masks:
                if col in masks:
                    os.pwrite(fds[col], np.ascontiguousarray(masks[col]).tobytes(), i * s2)
            out.append((i, reason, [c for c in spec.masks if c in masks], fp))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


# ---------------------------------------------------------------- build / open


def _reserve(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        if nbytes:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as exc:
                raise DataError(f"cannot reserve {nbytes / 2**20:.0f} MB for the input cache in {path.parent.parent} "
                                f"({exc.strerror}); free disk space or pass --cache-dir on another disk.") from exc


def _clean_stale(root: Path) -> None:
    for p in root.glob("*.partial-*"):
        try:
            pid = int(p.name.split(".partial-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def _decode_chunks(chunks: list, spec: CacheSpec, tmp: Path, workers: int, bar) -> list:
    """Decode every chunk: ``workers - 1`` spawned processes take chunks from the front while this
    process takes them from the back (so the processes' start-up costs nothing and no core idles)."""
    results = []
    if workers > 1 and len(chunks) > 1:
        try:
            with ProcessPoolExecutor(workers - 1, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_write_chunk, str(tmp), ch, spec) for ch in chunks]
                for i in reversed(range(len(futs))):
                    if futs[i].cancel():  # not started by a worker yet: do it here
                        results.append(_write_chunk(str(tmp), chunks[i], spec))
                        bar.update(len(chunks[i]))
                for f in as_completed([f for f in futs if not f.cancelled()]):
                    results.append(f.result())
                    bar.update(len(results[-1]))
            return results
        except BrokenProcessPool as exc:  # e.g. an interpreter whose __main__ cannot be re-imported
            print(f"WARNING: cache worker processes failed to start ({exc}); decoding in this process",
                  file=sys.stderr)
            results = []
    for ch in chunks:
        results.append(_write_chunk(str(tmp), ch, spec))
        bar.update(len(ch))
    return results


def _build(rows: list[dict], spec: CacheSpec, tmp: Path, workers: int, progress: bool) -> dict:
    n, s2 = len(rows), spec.image_size ** 2
    tmp.mkdir(parents=True)
    _reserve(tmp / "images.u8", n * s2)
    for col in spec.masks:
        _reserve(tmp / f"mask-{col}.u8", n * s2)
    chunks = [list(enumerate(rows))[i:i + CHUNK] for i in range(0, n, CHUNK)]
    reasons, has = [""] * n, {c: np.zeros(n, bool) for c in spec.masks}
    bar = tqdm(total=n, desc=f"caching inputs at {spec.image_size} px", unit="img", disable=not progress,
               mininterval=0.5)
    results = _decode_chunks(chunks, spec, tmp, workers, bar)
    bar.close()
    fps = Fingerprints.empty(n)
    for chunk in results:
        for i, reason, present, fp in chunk:
            reasons[i] = reason
            for c in present:
                has[c][i] = True
            if fp is not None:
                fps.set(i, *fp)
    fps.save(tmp / FINGERPRINTS)
    return {"n": n, "spec": asdict(spec), "reasons": reasons, "has_mask": {c: v.tolist() for c, v in has.items()},
            "paths": [r["path"] for r in rows], "version": VERSION}


def open_cache(rows: list[dict], spec: CacheSpec, cache_dir: str | Path | None = None, workers: int | None = None,
               progress: bool = True) -> InputCache:
    """The cache for these manifest rows (dicts with 'path' and the mask columns), built if needed."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"cache folder {root} cannot be written ({exc.strerror or exc}); pass --cache-dir with a "
                        f"writable folder.") from exc
    key = cache_key(rows, spec)
    final = root / key
    built = None
    if not (final / "meta.json").exists():
        _clean_stale(root)
        tmp = root / f"{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        try:
            meta = _build(rows, spec, tmp, default_workers(cap=16) if workers is None else workers, progress)
            (tmp / "meta.json").write_text(json.dumps(meta))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"writing the input cache in {root} failed ({exc.strerror or exc}); free disk space or "
                            f"pass --cache-dir elsewhere. Nothing half-written was kept.") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        built = time.perf_counter() - t0
    return _open(final, spec, len(rows), built)


FINGERPRINTS = "fingerprints.npz"


@dataclass
class Fingerprints:
    """Per image: sha256 (32 bytes), perceptual hashes (plain, mirrored) and a 32 x 32 thumbnail;
    ``known`` False where the file could not be read."""

    sha: np.ndarray
    phash: np.ndarray
    phash_mirror: np.ndarray
    thumbs: np.ndarray
    known: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Fingerprints":
        return cls(np.zeros((n, 32), np.uint8), np.zeros(n, np.uint64), np.zeros(n, np.uint64),
                   np.zeros((n, THUMB_SIZE, THUMB_SIZE), np.uint8), np.zeros(n, bool))

    def set(self, i: int, sha: bytes, phash: int, phash_mirror: int, thumb: np.ndarray) -> None:
        self.sha[i] = np.frombuffer(sha, np.uint8)
        self.phash[i], self.phash_mirror[i] = np.uint64(phash), np.uint64(phash_mirror)
        self.thumbs[i], self.known[i] = thumb, True

    def subset(self, idx) -> "Fingerprints":
        return Fingerprints(self.sha[idx], self.phash[idx], self.phash_mirror[idx], self.thumbs[idx], self.known[idx])

    def save(self, path: Path) -> None:
        np.savez_compressed(path, sha=self.sha, phash=self.phash, phash_mirror=self.phash_mirror,
                            thumbs=self.thumbs, known=self.known)

    @classmethod
    def load(cls, path: Path) -> "Fingerprints":
        d = np.load(path)
        return cls(d["sha"], d["phash"], d["phash_mirror"], d["thumbs"], d["known"])


def _open(folder: Path, spec: CacheSpec, n: int, built: float | None) -> InputCache:
    meta = json.loads((folder / "meta.json").read_text())
    shape = (n, spec.image_size, spec.image_size)

    def arr(name):
        return np.memmap(folder / name, np.uint8, "r", shape=shape) if n else np.zeros(shape, np.uint8)

    reasons = meta["reasons"]
    return InputCache(folder, spec, arr("images.u8"), {c: arr(f"mask-{c}.u8") for c in spec.masks},
                      np.array([not r for r in reasons], bool), reasons,
                      {c: np.array(v, bool) for c, v in meta["has_mask"].items()}, built)


def fingerprints(cache: InputCache) -> Fingerprints:
    return Fingerprints.load(cache.path / FINGERPRINTS)

"""The decoded-input cache (reuse, invalidation, failures) and the batch loader over it."""
import errno
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.data import cache as C
from covidcxr.data import preprocess as P
from covidcxr.data.imageio import read_image, read_mask
from covidcxr.errors import DataError
from tests.conftest import random_cxr, write_png


@pytest.fixture
def rows(tmp_path):
    out = []
    for i in range(10):
        img = write_png(tmp_path / "img" / f"{i}.png", random_cxr(i, 48))
        m = np.zeros((48, 48), np.uint8)
        m[10:30, 5 + i:25 + i] = 255
        out.append({"path": str(img), "lung_mask": str(write_png(tmp_path / "mask" / f"{i}.png", m)) if i % 3 else ""})
    return out


def test_build_values_reuse_and_masks(rows, tmp_path):
    spec = C.CacheSpec(32, "clahe", ("lung_mask",))
    c = C.open_cache(rows, spec, tmp_path / "c", workers=0, progress=False)
    assert c.built_seconds is not None and c.ok.all() and c.images.shape == (10, 32, 32)
    np.testing.assert_array_equal(c.images[3], P.prepare(read_image(rows[3]["path"]), 32, "clahe"))
    np.testing.assert_array_equal(c.masks["lung_mask"][4], P.resize_mask(read_mask(rows[4]["lung_mask"]), 32))
    assert c.has_mask["lung_mask"].tolist() == [bool(r["lung_mask"]) for r in rows]
    again = C.open_cache(rows, spec, tmp_path / "c", workers=0, progress=False)
    assert again.built_seconds is None and again.path == c.path  # reused, not rebuilt
    fp = C.fingerprints(again)
    assert fp.known.all() and fp.thumbs.shape == (10, 32, 32) and len({bytes(s) for s in fp.sha}) == 10


def test_invalidated_by_the_manifest_files_and_settings(rows, tmp_path):
    spec = C.CacheSpec(32)
    base = C.open_cache(rows, spec, tmp_path / "c", workers=0, progress=False).path
    assert C.open_cache(rows[:-1], spec, tmp_path / "c", workers=0, progress=False).path != base   # other rows
    assert C.open_cache(rows, C.CacheSpec(40), tmp_path / "c", workers=0, progress=False).path != base  # size
    assert C.open_cache(rows, C.CacheSpec(32, "gamma"), tmp_path / "c", workers=0, progress=False).path != base
    write_png(Path(rows[0]["path"]), random_cxr(99, 48))  # the image changed on disk
    os.utime(rows[0]["path"], (time.time() + 5, time.time() + 5))
    changed = C.open_cache(rows, spec, tmp_path / "c", workers=0, progress=False)
    assert changed.path != base and changed.built_seconds is not None
    np.testing.assert_array_equal(changed.images[0], P.prepare(read_image(rows[0]["path"]), 32))


def test_parallel_workers_give_the_same_cache(rows, tmp_path):
    a = C.open_cache(rows, C.CacheSpec(32, "none", ("lung_mask",)), tmp_path / "a", workers=0, progress=False)
    b = C.open_cache(rows, C.CacheSpec(32, "none", ("lung_mask",)), tmp_path / "b", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(np.asarray(a.masks["lung_mask"]), np.asarray(b.masks["lung_mask"]))


def test_unreadable_files_are_listed_with_reasons(rows, tmp_path):
    rows = [dict(r) for r in rows]
    open(rows[2]["path"], "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    os.unlink(rows[5]["path"])
    open(rows[7]["lung_mask"], "wb").write(b"nope")
    c = C.open_cache(rows, C.CacheSpec(32, "none", ("lung_mask",)), tmp_path / "c", workers=0, progress=False)
    reasons = dict(c.failed)
    assert set(reasons) == {2, 5, 7} and not c.ok[[2, 5, 7]].any() and c.ok.sum() == 7
    assert "file not found" in reasons[5] and "unreadable lung mask" in reasons[7]


def test_unwritable_cache_folder_is_one_clear_error(rows, tmp_path):
    blocked = tmp_path / "file"  # a file where the folder should be: cannot be created or written
    blocked.write_text("x")
    with pytest.raises(DataError, match=f"cache folder {blocked}.*--cache-dir"):
        C.open_cache(rows, C.CacheSpec(32), blocked, workers=0, progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root writes anywhere: the case above covers it)
            with pytest.raises(DataError, match="--cache-dir"):
                C.open_cache(rows, C.CacheSpec(32), ro / "c", workers=0, progress=False)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("where", ["reserve", "write"])
def test_a_full_disk_leaves_no_half_written_cache(rows, tmp_path, monkeypatch, where):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "reserve":
        monkeypatch.setattr(os, "posix_fallocate", full)
    else:
        calls = {"n": 0}
        real = os.pwrite

        def fill_up(fd, data, offset):
            calls["n"] += 1
            return full() if calls["n"] > 3 else real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", fill_up)
    with pytest.raises(DataError, match="--cache-dir"):
        C.open_cache(rows, C.CacheSpec(32), tmp_path / "c", workers=0, progress=False)
    assert list((tmp_path / "c").iterdir()) == []  # nothing kept, not even a .partial
    monkeypatch.undo()
    ok = C.open_cache(rows, C.CacheSpec(32), tmp_path / "c", workers=0, progress=False)
    assert ok.ok.all()


def test_a_crashed_build_is_cleaned_and_rebuilt(rows, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    key = C.cache_key(rows, C.CacheSpec(32))
    stale = root / f"{key}.partial-999999999-abcdef"   # a dead process's half-written build
    stale.mkdir()
    (stale / "images.u8").write_bytes(b"\0" * 10)
    c = C.open_cache(rows, C.CacheSpec(32), root, workers=0, progress=False)
    assert not stale.exists() and c.ok.all() and c.path == root / key


# ---------------------------------------------------------------- batches


def _run_data(rows, tmp_path, mask_column="lung_mask"):
    from covidcxr.training.data import open_run_data

    df = pd.DataFrame({"path": [r["path"] for r in rows], "lung_mask": [r["lung_mask"] for r in rows],
                       "label": ["a", "b"] * 5, "split": ["train"] * 8 + ["val"] * 2})
    return open_run_data(df, ["a", "b"], 32, "none", mask_column=mask_column, cache_dir=tmp_path / "c",
                         workers=0, progress=False)


def test_batches_are_a_function_of_seed_and_epoch(rows, tmp_path):
    from covidcxr.training.data import Batches

    data = _run_data(rows, tmp_path)
    tr = data.rows("train")

    def epoch(seed, e):
        b = Batches(data, tr, 3, shuffle=True, seed=seed, class_weight={"a": 2.0, "b": 0.5})
        b.set_epoch(e)
        out = [b[i] for i in range(len(b))]
        b.close()
        return out

    first = epoch(7, 0)
    assert len(first) == 2  # 8 rows, batch 3: the last partial batch is dropped in training
    for (x1, y1), (x2, y2) in zip(first, epoch(7, 0)):
        np.testing.assert_array_equal(x1["image"], x2["image"])
    assert not np.array_equal(first[0][0]["image"], epoch(7, 1)[0][0]["image"])
    assert not np.array_equal(first[0][0]["image"], epoch(8, 0)[0][0]["image"])
    x, y = first[0]
    assert x["image"].shape == (3, 32, 32, 1) and x["image"].dtype == np.uint8 and y.shape == (3, 2)
    np.testing.assert_array_equal(x["class_weight"], np.where(y[:, 0] == 1, 2.0, 0.5))
    # each batch's mask belongs to its image (same cache row), and its weight says whether it has one
    for xb, _ in first:
        for img, m in zip(xb["image"], xb["mask"]):
            row = int(np.flatnonzero((np.asarray(data.cache.images) == img[..., 0]).all(axis=(1, 2)))[0])
            np.testing.assert_array_equal(m[..., 0], data.cache.masks["lung_mask"][row])


def test_evaluation_batches_cover_every_row_once_padded(rows, tmp_path):
    from covidcxr.training.data import Batches

    data = _run_data(rows, tmp_path)
    b = Batches(data, np.arange(10), 4)
    assert len(b) == 3 and [b.valid(i) for i in range(3)] == [4, 4, 2]
    last, _ = b[2]
    assert last["image"].shape[0] == 4  # padded to the batch size: one compiled shape
    seen = np.concatenate([b[i][0]["image"][:b.valid(i)] for i in range(3)])
    np.testing.assert_array_equal(seen, np.asarray(data.cache.images)[..., None])

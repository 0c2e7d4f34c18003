"""covidcxr.predict: batched = per-image, resume after a kill, shards and merge, bad inputs, usage
errors, masks and Grad-CAM. Models are tiny (32 px, random weights, built once per module)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import random_cxr, shared_path, write_png

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


def _classifier(folder: Path, classes=CLASSES, export: bool = True, checks=()) -> Path:
    """A random-weight resnet18 classifier at 32 px: model.keras + model_card.json (+ serving/1)."""
    from covidcxr.artifacts import ModelCard, locate
    from covidcxr.exporting.savedmodel import export_model
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    spec = get_spec("resnet18")
    src = folder.with_name(folder.name + "_src") if export else folder
    src.mkdir(parents=True)
    build_classifier(spec, len(classes), 32, None).save(src / "model.keras")
    ModelCard(list(classes), "resnet18", image_size=32, normalization=spec.normalization).save(src)
    return export_model(locate(src), folder, checks=list(checks), log=lambda *a: None) if export else src


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """11 gray PNGs of varied sizes in two folders; 'a/dup.png' and 'b/dup.png' share a name."""
    root = tmp_path_factory.mktemp("imgs")
    for i in range(9):
        arr = random_cxr(i, 48)[: 40 + i, : 48 - i]
        write_png(root / ("a" if i % 2 else "b") / f"img{i:02d}.png", np.ascontiguousarray(arr))
    write_png(root / "a" / "dup.png", random_cxr(20, 40))
    write_png(root / "b" / "dup.png", random_cxr(21, 56))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, images) -> dict:
    from covidcxr.artifacts import ModelCard
    from covidcxr.models.segmentation import build_segmenter

    root = tmp_path_factory.mktemp("models")
    seg = root / "seg"
    seg.mkdir()
    build_segmenter("unet", 32).save(seg / "model.keras")
    ModelCard(CLASSES, "unet", task="segment", image_size=32, target="lung").save(seg)
    return {"cls": _classifier(root / "cls", checks=[str(next(images.rglob("*.png")))]),
            "other": _classifier(root / "other", CLASSES[:3], export=False), "seg": seg}


def predict(*argv) -> int:
    from covidcxr import predict as P

    return P.main([str(a) for a in argv])


def rows(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, float_precision="round_trip")
    return df.sort_values("path").reset_index(drop=True)


@pytest.mark.parametrize("prefer", ["keras", "savedmodel"])
def test_batched_equals_per_image(models, images, tmp_path, prefer):
    # 11 files in batches of 4 (the last holds 3) against one file per model call.
    for bs in (4, 1):
        assert predict("--model", models["cls"], images, "--out", tmp_path / f"b{bs}.csv", "--batch-size", bs,
                       "--prefer", prefer, "--quiet") == 0
    a, b = rows(tmp_path / "b4.csv"), rows(tmp_path / "b1.csv")
    assert len(a) == 11 and list(a.columns) == ["path", "label"] + [f"prob_{c}" for c in CLASSES]
    assert (a["path"] == b["path"]).all() and (a["label"] == b["label"]).all()
    probs = a.filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs, b.filter(like="prob_").to_numpy(), atol=1e-5)
    assert probs.std(axis=0).max() > 1e-4  # the model tells the images apart: the comparison means something
    meta = json.loads((tmp_path / "b4.csv.meta.json").read_text())
    assert meta["model"]["kind"] == prefer and meta["complete"] and meta["rows"] == 11 and meta["shard"] == [1, 1]
    assert not (tmp_path / "b4.csv.skipped.csv").exists()  # written only when something is skipped


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_resume_after_kill(models, tmp_path, fmt):
    data = tmp_path / "many"
    for i in range(300):
        write_png(data / f"{i:03d}.png", random_cxr(i, 24))
    full, cut = tmp_path / f"full.{fmt}", tmp_path / f"cut.{fmt}"
    assert predict("--model", models["cls"], data, "--out", full, "--batch-size", 3, "--quiet") == 0
    # Kill a real run once a few batches are on disk; then cut its last line mid-way (a kill mid-write).
    cmd = [sys.executable, "-m", "covidcxr.predict", "--model", str(models["cls"]), str(data), "--out", str(cut),
           "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = cut.with_name(cut.name + ".parts")
    written = (lambda: cut.exists() and cut.read_bytes().count(b"\n") > 6) if fmt == "csv" else \
        (lambda: parts.is_dir() and len(list(parts.glob("*.parquet"))) > 5)
    deadline = time.time() + 120
    while not written() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if fmt == "csv":
        with open(cut, "rb+") as f:
            f.truncate(os.path.getsize(cut) - 9)
        assert cut.read_bytes().count(b"\n") - 1 < 300
    else:
        assert not cut.exists() and len(list(parts.glob("*.parquet"))) < 300
        (parts / "999999999.tmp").write_bytes(b"PAR1 half a part")
    assert predict("--model", models["cls"], data, "--out", cut, "--batch-size", 3, "--quiet") == 2  # needs --resume
    assert predict("--model", models["cls"], data, "--out", cut, "--batch-size", 3, "--quiet", "--resume") == 0
    a, b = rows(full), rows(cut)
    assert len(b) == 300 and (a["path"] == b["path"]).all() and (a["label"] == b["label"]).all()
    np.testing.assert_allclose(a.filter(like="prob_").to_numpy(), b.filter(like="prob_").to_numpy(), atol=1e-6)
    assert json.loads(cut.with_name(cut.name + ".meta.json").read_text())["complete"]


def test_shards_cover_every_file_once():
    from covidcxr.prediction.shards import in_shard

    paths = [f"archive/{i // 100}/img{i:05d}.png" for i in range(1000)]
    for n in (1, 2, 3, 7):
        owners = [[k for k in range(1, n + 1) if in_shard(p, k, n)] for p in paths]
        assert all(len(o) == 1 for o in owners)
        sizes = np.bincount([o[0] for o in owners], minlength=n + 1)[1:]
        assert sizes.min() > 0.6 * len(paths) / n  # roughly even


def test_shard_runs_and_merge(models, images, tmp_path, capsys):
    bad = images.parent / (images.name + "_bad.png")
    bad.write_bytes(b"not a png")
    common = ["--model", models["cls"], images, bad, "--batch-size", 4, "--quiet", "--skip-bad"]
    assert predict(*common, "--out", tmp_path / "all.csv") == 0
    for k in (1, 2, 3):
        assert predict(*common, "--out", tmp_path / f"s{k}.csv", "--shard", f"{k}/3") == 0
    shards = [tmp_path / f"s{k}.csv" for k in (1, 2, 3)]
    assert sum(len(rows(s)) for s in shards) == 11
    assert predict("merge", *shards[:2], "--out", tmp_path / "m.csv") == 2
    assert "missing shard(s) 3/3" in capsys.readouterr().err
    assert predict("merge", *shards, "--out", tmp_path / "m.csv") == 0
    assert (tmp_path / "m.csv").read_bytes() == (tmp_path / "all.csv").read_bytes()  # same rows, same order
    assert pd.read_csv(tmp_path / "m.csv.skipped.csv")["path"].tolist() == [str(bad)]
    # A row of shard 3 pasted into shard 1: scored twice.
    with open(shards[2], newline="") as f:
        extra = list(csv.reader(f))[1]
    with open(shards[0], "a", newline="") as f:
        csv.writer(f).writerow(extra)
    capsys.readouterr()
    assert predict("merge", *shards, "--out", tmp_path / "m2.csv") == 2
    err = capsys.readouterr().err.strip()
    assert "scored twice" in err and extra[0] in err and len(err.splitlines()) == 1


def test_bad_inputs_are_listed(models, images, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(6):
        write_png(data / f"f{i}.png", random_cxr(i, 40))
    (data / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")   # mid-batch
    missing = tmp_path / "nope.png"
    args = ["--model", models["cls"], data, missing, "--batch-size", 4, "--quiet"]
    assert predict(*args, "--out", tmp_path / "p.csv") == 1
    err = capsys.readouterr().err
    assert "2 input(s) missing or unreadable" in err and "f2.png" in err and "nope.png: no such file" in err
    assert rows(tmp_path / "p.csv")["path"].tolist() == [str(data / f"f{i}.png") for i in (0, 1, 3, 4, 5)]
    skipped = pd.read_csv(tmp_path / "p.csv.skipped.csv").set_index("path")["reason"]
    assert set(skipped.index) == {str(data / "f2.png"), str(missing)} and skipped.str.len().min() > 5
    assert predict(*args, "--out", tmp_path / "q.csv", "--skip-bad") == 0


@pytest.mark.parametrize("shard", ["3/2", "0/0", "x"])
def test_bad_shard_is_one_line(models, images, tmp_path, capsys, shard):
    assert predict("--model", models["cls"], images, "--out", tmp_path / "p.csv", "--shard", shard) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shard") and len(err.splitlines()) == 1


def test_flags_that_do_not_apply(models, images, tmp_path, capsys):
    sm = models["cls"] / "serving" / "1"
    for model, flag in ((models["cls"], ["--masks", tmp_path / "m"]), (sm, ["--gradcam", tmp_path / "g"]),
                        (models["seg"], ["--calibrated"]), (models["cls"], ["--lung-masks", tmp_path]),
                        (models["cls"], ["--calibrated"])):  # the last: no calibration.json beside the model
        assert predict("--model", model, images, "--out", tmp_path / "p.csv", *flag) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag[0]}") and len(err.splitlines()) == 1
    assert "calibration.json" in err and "covidcxr.evaluate" in err


def test_resume_refuses_another_model(models, images, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert predict("--model", models["cls"], images, "--out", out, "--quiet") == 0
    assert predict("--model", models["other"], images, "--out", out, "--quiet", "--resume") == 2
    err = capsys.readouterr().err
    assert str(models["cls"]) in err and str(models["other"]) in err and "Viral Pneumonia" in err


def test_segmenter_masks_at_input_size(models, images, tmp_path):
    out, mdir = tmp_path / "seg.parquet", tmp_path / "masks"
    assert predict("--model", models["seg"], images, "--out", out, "--masks", mdir, "--batch-size", 4,
                   "--quiet") == 0
    df = rows(out)
    assert list(df.columns) == ["path", "mask_path", "mask_fraction", "height", "width"] and len(df) == 11
    assert df["mask_path"].nunique() == 11  # the two dup.png get different names
    for r in df.itertuples():
        with Image.open(r.path) as src, Image.open(r.mask_path) as m:
            assert m.size == src.size == (r.width, r.height)
            assert abs((np.asarray(m) > 0).mean() - r.mask_fraction) < 1e-9


def test_gradcam_and_calibration(models, images, tmp_path):
    from covidcxr.calibration import apply_temperature, save_temperature

    cal = save_temperature(tmp_path / "cal.json", 3.0, "test", 10, 0.2, 0.1)
    assert predict("--model", models["cls"], images, "--out", tmp_path / "a.csv", "--quiet") == 0
    assert predict("--model", models["cls"], images, "--out", tmp_path / "b.csv", "--calibration", cal, "--gradcam",
                   tmp_path / "cams", "--batch-size", 4, "--quiet") == 0
    a, b = rows(tmp_path / "a.csv"), rows(tmp_path / "b.csv")
    np.testing.assert_allclose(b.filter(like="prob_").to_numpy(),
                               apply_temperature(a.filter(like="prob_").to_numpy(), 3.0), atol=1e-6)
    cams = sorted((tmp_path / "cams").glob("*_gradcam.png"))
    assert len(cams) == 11 and sum(c.name.startswith("dup_") for c in cams) == 2


def _mask_layouts(root: Path) -> Path:
    """A Kaggle class (images/ + masks/) and a COVID-QU-Ex split (images/, lung masks/, infection masks/),
    3 films each: 6 X-rays and 9 masks, with a plain folder named 'masks' (no images/ beside it) of 1 film."""
    for i in range(3):
        write_png(root / "COVID" / "images" / f"c{i}.png", random_cxr(i, 40))
        write_png(root / "COVID" / "masks" / f"c{i}.png", random_cxr(10 + i, 32))
        for sub in ("images", "lung masks", "infection masks"):
            write_png(root / "Train" / "Normal" / sub / f"n{i}.png", random_cxr(20 + i, 36))
    write_png(root / "notes" / "masks" / "film.png", random_cxr(30, 40))  # not a layout's mask folder
    return root


def test_input_list_leaves_out_layout_mask_folders(tmp_path):
    from covidcxr.prediction.shards import input_list

    root = _mask_layouts(tmp_path / "data")
    entries, bad, masks = input_list([str(root), str(root / "COVID" / "masks" / "c1.png")])
    assert not bad and len(entries) == 3 + 3 + 1 + 1
    assert str(root / "COVID" / "masks" / "c1.png") in entries  # passed by its own path: scored
    assert str(root / "notes" / "masks" / "film.png") in entries
    assert not any("lung masks" in e or "infection masks" in e for e in entries)
    assert masks == {str(root / "COVID" / "masks"): 3, str(root / "Train" / "Normal" / "infection masks"): 3,
                     str(root / "Train" / "Normal" / "lung masks"): 3}


def test_predict_on_a_dataset_folder_scores_no_masks(models, synth_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert predict("--model", models["cls"], synth_dir, "--out", out, "--batch-size", 8, "--quiet") == 0
    films = sorted(str(p) for p in synth_dir.rglob("images/*.png"))
    mask_dirs = sorted({str(p.parent) for p in synth_dir.rglob("masks/*.png")})
    assert mask_dirs and rows(out)["path"].tolist() == films
    err = capsys.readouterr().err
    n_masks = len(list(synth_dir.rglob("masks/*.png")))
    assert f"left out {n_masks} mask file(s) in {len(mask_dirs)} mask folder(s)" in err and mask_dirs[0] in err
    meta = json.loads((tmp_path / "p.csv.meta.json").read_text())
    assert meta["masks_left_out"] == {"files": n_masks, "folders": {d: len(list(Path(d).glob("*.png")))
                                                                    for d in mask_dirs}}


def test_real_covid_qu_ex_folder_lists_only_films():
    from covidcxr.prediction.shards import input_list

    root = shared_path("covid-qu-ex-sample")
    entries, bad, masks = input_list([str(root)])
    assert not bad and len(entries) == 360 and all("/images/" in e for e in entries)
    assert sum(masks.values()) == 600 and len(masks) == 12

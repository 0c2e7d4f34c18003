"""predict --engine ray: a local Ray (ray.init(num_cpus=2)) scores the real films of cxr-sample with a
tiny trained model, and its rows equal predict's CSV (same files, probabilities within 1e-6); a junk
file becomes an error row. The actor class on file bytes, segmenter rows, calibrated and operating-point
columns, and the flags --engine ray refuses (no Ray started for those)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr import artifacts as A
from covidcxr import predict as P
from covidcxr import train
from covidcxr.tasks import get_task
from tests.conftest import random_cxr, shared_path, write_png

QUICK = ["--weights", "none", "--epochs", "1", "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8"]
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray (extra [ray]) not installed")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """mobilenetv3small, one epoch at 32 px on cxr-sample (real films)."""
    run = tmp_path_factory.mktemp("ray") / "run"
    assert train.main(["--data", str(shared_path("cxr-sample")), "--arch", "mobilenetv3small", *QUICK,
                       "--run-dir", str(run), "--export-dir", "none"]) == 0
    return run


@pytest.fixture(scope="module")
def local_ray():
    if not HAS_RAY:
        pytest.skip("ray (extra [ray]) not installed")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("junk") / "junk.png"
    path.write_text("not an image\n")
    return path


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _multitask(folder: Path) -> Path:
    """An export-like folder of a random-init multi-task U-Net at 32 px."""
    folder.mkdir(parents=True)
    classes = ["COVID-19", "Non-COVID", "Normal"]
    get_task("multitask").build("unet", 32, len(classes), None, 0.2, None).save(folder / A.EXPORT_MODEL)
    A.ModelCard(classes, "unet", task="multitask", image_size=32, target="lung").save(folder)
    return folder


def test_ray_rows_equal_predict_on_real_films(run_dir, local_ray, junk, tmp_path, capsys):
    films = shared_path("cxr-sample")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{junk}\n\n")                       # --inputs-from: the junk file, a blank line
    assert P.main(["--model", str(run_dir), str(films), str(junk), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 1
    code = P.main(["--model", str(run_dir), str(films), "--inputs-from", str(listed), "--engine", "ray",
                   "--actors", "2", "--batch-size", "16", "--out", str(tmp_path / "r.parquet")])
    assert code == 1                                          # an input had an error (0 with --skip-bad)
    ref, got = _csv(tmp_path / "p.csv"), pd.read_parquet(tmp_path / "r.parquet")
    n_films = len(list(films.rglob("images/*.png")))
    assert len(ref) == n_films == 350 and len(got) == n_films + 1
    assert list(got["path"]) == sorted(got["path"])          # one row per file, in path order
    bad = got[got["error"] != ""]
    assert list(bad["path"]) == [str(junk)] and "not an image" in bad["error"].iloc[0]
    assert bad["label"].isna().all() and bad.filter(like="prob_").isna().all().all()
    ok = got[got["error"] == ""].reset_index(drop=True)
    assert list(ok.columns[:-1]) == list(ref.columns) and ok.columns[-1] == "error"
    assert list(ok["path"]) == list(ref["path"]) and list(ok["label"]) == list(ref["label"])
    assert np.abs(ok.filter(like="prob_").to_numpy() - ref.filter(like="prob_").to_numpy()).max() <= 1e-6
    meta = json.loads((tmp_path / "r.parquet.meta.json").read_text())
    assert meta["complete"] and meta["rows"] == n_films and meta["skipped"] == 1 and meta["engine"]["actors"] == 2
    assert meta["masks_left_out"]["files"] == 100                 # Viral Pneumonia/masks/ is not scored
    assert "1 with an error" in capsys.readouterr().out


def test_ray_calibrated_operating_point_and_segmenter_columns(run_dir, local_ray, tmp_path):
    films = sorted(shared_path("cxr-sample").rglob("images/*.png"))[::25]
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"temperature": 1.7}))
    flags = ["--calibration", str(cal), "--operating-point", "COVID:threshold=0.3"]
    args = ["--model", str(run_dir), *map(str, films), *flags]
    assert P.main([*args, "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert P.main([*args, "--engine", "ray", "--out", str(tmp_path / "r.parquet")]) == 0
    ref, got = _csv(tmp_path / "p.csv"), pd.read_parquet(tmp_path / "r.parquet")
    assert "flag_COVID" in ref.columns and list(got.columns) == list(ref.columns) + ["error"]
    assert (got["flag_COVID"].to_numpy() == ref["flag_COVID"].to_numpy()).all()
    assert np.abs(got.filter(like="prob_").to_numpy() - ref.filter(like="prob_").to_numpy()).max() <= 1e-6

    mt = _multitask(tmp_path / "mt")
    assert P.main(["--model", str(mt), *map(str, films), "--out", str(tmp_path / "m.csv"), "--quiet"]) == 0
    assert P.main(["--model", str(mt), *map(str, films), "--engine", "ray", "--masks", str(tmp_path / "rm"),
                   "--out", str(tmp_path / "m.parquet")]) == 0
    ref, got = _csv(tmp_path / "m.csv"), pd.read_parquet(tmp_path / "m.parquet")
    for col in ("label", "height", "width", "mask_fraction"):
        assert list(got[col]) == list(ref[col]), col
    names = sorted(Path(p).name for p in got["mask_path"])
    assert names == sorted(Path(p).name for p in ref["mask_path"]) == sorted(p.name for p in (tmp_path / "rm").iterdir())


def test_actor_class_on_file_bytes_equals_predict(run_dir, junk, tmp_path):
    """RayScorer on a batch of bytes (as ray.data.read_binary_files gives them), without Ray."""
    from covidcxr.prediction.ray import RayScorer

    films = sorted(shared_path("cxr-sample").rglob("images/*.png"))[::40]
    write_png(tmp_path / "gray16.png", (random_cxr(3, 64).astype(np.uint16) * 257), "I;16")
    files = [*films, tmp_path / "gray16.png", junk]
    assert P.main(["--model", str(run_dir), *map(str, files), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 1
    ref = _csv(tmp_path / "p.csv").set_index("path")
    scorer = RayScorer(str(run_dir), batch_size=4)
    table = scorer({"path": np.array([f"mem://{f.name}" for f in files]),
                    "bytes": np.array([f.read_bytes() for f in files], dtype=object)}).to_pandas()
    assert len(table) == len(files) and table["error"].iloc[-1] != "" and (table["error"].iloc[:-1] == "").all()
    for f, (_, row) in zip(files[:-1], table.iloc[:-1].iterrows()):
        want = ref.loc[str(f)]
        assert row["label"] == want["label"]
        assert np.abs(row.filter(like="prob_").to_numpy(float) - want.filter(like="prob_").to_numpy(float)).max() <= 1e-6


@pytest.mark.parametrize("extra, words", [
    (["--shard", "1/2"], "--shard"), (["--resume"], "--resume"), (["--gradcam", "g"], "Grad-CAM"),
    (["--masks", "m"], "--masks is for segmentation"), (["--out", "x.csv"], "writes Parquet"),
    (["--actors", "0"], "--actors must be at least 1")])
def test_engine_ray_refuses_what_it_cannot_do(run_dir, tmp_path, capsys, extra, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    film = next(shared_path("cxr-sample").rglob("images/*.png"))
    out = [] if "--out" in extra else ["--out", "r.parquet"]
    assert P.main(["--model", str(run_dir), str(film), "--engine", "ray", *out, *extra]) == 2
    assert words in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ray_flags_need_engine_ray_and_uris_need_ray(run_dir, tmp_path, capsys):
    film = next(shared_path("cxr-sample").rglob("images/*.png"))
    assert P.main(["--model", str(run_dir), str(film), "--actors", "2", "--out", str(tmp_path / "p.csv")]) == 2
    assert "--actors: for --engine ray" in capsys.readouterr().err
    assert P.main(["--model", str(run_dir), "s3://bucket/x.png", "--out", str(tmp_path / "p.csv")]) == 2
    assert "object storage is read by --engine ray" in capsys.readouterr().err
    assert P.main(["--model", str(run_dir), "--inputs-from", str(tmp_path / "none.txt"),
                   "--out", str(tmp_path / "p.csv")]) == 2
    assert "--inputs-from" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()

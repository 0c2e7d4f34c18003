import json
import subprocess
import sys

import pandas as pd

from covidcxr.data.cli import main
from tests.conftest import shared_path


def test_synth_writes_kaggle_layout_with_masks(tmp_path):
    assert main(["synth", str(tmp_path / "s"), "--per-class", "3", "--size", "48", "--quiet"]) == 0
    for cls in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        assert len(list((tmp_path / "s" / cls / "images").glob("*.png"))) == 3
        assert len(list((tmp_path / "s" / cls / "masks").glob("*.png"))) == 3
    assert main(["synth", str(tmp_path / "s"), "--per-class", "3", "--quiet"]) == 2  # no overwrite


def test_index_lists_and_skips_corrupt_png(synth_copy, tmp_path, capsys):
    bad = synth_copy / "Normal" / "images" / "Normal-2.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (synth_copy / "Normal" / "images" / "notes.txt").write_text("hello")
    out = tmp_path / "m.csv"
    assert main(["index", str(synth_copy), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Normal-2.png" in err and "truncated" in err and "notes.txt" in err
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 31 and not df["path"].str.contains("Normal-2.png").any()
    assert set(df.columns) >= {"path", "label", "lung_mask", "infection_mask", "split", "sha256", "group"}
    assert (df["lung_mask"] != "").all()
    # --strict fails on the same problems; an existing manifest is not overwritten.
    assert main(["index", str(synth_copy), "--out", str(tmp_path / "m2.csv"), "--quiet", "--strict"]) == 1
    assert main(["index", str(synth_copy), "--out", str(out), "--quiet"]) == 2


def test_index_never_writes_into_the_data_folder(synth_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(synth_copy) for p in synth_copy.rglob("*"))
    assert main(["index", str(synth_copy), "--quiet"]) == 0
    assert (tmp_path / "manifest.csv").exists()  # the default: the current folder
    assert main(["index", str(synth_copy), "--out", str(synth_copy / "manifest.csv"), "--quiet"]) == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert main(["index", str(synth_copy), "--out", str(synth_copy / "COVID" / "m.csv"), "--quiet"]) == 2
    assert sorted(p.relative_to(synth_copy) for p in synth_copy.rglob("*")) == before


def test_index_missing_folder_exits_nonzero(tmp_path, capsys):
    assert main(["index", str(tmp_path / "absent"), "--quiet"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_audit_strict_flags_crossing_group(synth_copy, tmp_path):
    out = tmp_path / "m.csv"
    main(["index", str(synth_copy), "--out", str(out), "--quiet", "--split", "0.5,0.5"])
    df = pd.read_csv(out, keep_default_na=False)
    # Leak a copy of a train image into val by hand.
    row = df[df["split"] == "train"].iloc[0].copy()
    copy = tmp_path / "leak.png"
    copy.write_bytes(open(row["path"], "rb").read())
    row["path"], row["split"] = str(copy), "val"
    pd.concat([df, row.to_frame().T]).to_csv(out, index=False)
    assert main(["audit", str(out), "--quiet", "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert len(a["crossing_groups"]) == 1 and a["exact_duplicate_pairs"] == 1
    assert main(["audit", str(out), "--quiet", "--strict"]) == 1


def test_download_offline_fails_fast_with_instructions(tmp_path):
    r = subprocess.run([sys.executable, "-m", "covidcxr.data", "download", "--dataset", "covid-qu-ex",
                        "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    if r.returncode == 0:  # a machine with Kaggle access really downloaded it
        return
    assert r.returncode == 2 and "kaggle.com/datasets/anasmohammedtahir/covidqu" in r.stderr


def test_index_real_kaggle_sample(tmp_path):
    root = shared_path("cxr-sample")
    assert main(["index", str(root), "--out", str(tmp_path / "m.csv"), "--quiet"]) == 0
    df = pd.read_csv(tmp_path / "m.csv", keep_default_na=False)
    assert df["label"].value_counts().to_dict() == {"Lung_Opacity": 130, "Viral Pneumonia": 100,
                                                    "COVID": 60, "Normal": 60}
    assert (df["lung_mask"] != "").sum() == 100
    assert (df[df["label"] == "Viral Pneumonia"]["lung_mask"] != "").all()
    assert set(df["split"]) == {"train", "val", "test"}
    assert set(df["mode"]) == {"L", "RGB"}


def test_index_real_covid_qu_ex_keeps_its_split_and_finds_leak(tmp_path):
    root = shared_path("covid-qu-ex-sample")
    assert main(["index", str(root), "--out", str(tmp_path / "m.csv"), "--quiet"]) == 0
    df = pd.read_csv(tmp_path / "m.csv", keep_default_na=False)
    t = pd.crosstab(df["label"], df["split"])
    assert (t["train"] == 80).all() and (t["val"] == 20).all() and (t["test"] == 20).all()
    assert (df["lung_mask"] != "").sum() == 300 and (df["infection_mask"] != "").sum() == 300
    # covid_1177 (Train) and covid_2022 (Val) are the same film: reported as crossing.
    assert main(["audit", str(tmp_path / "m.csv"), "--quiet", "--strict"]) == 1


def test_index_real_covid_qu_ex_train_has_no_duplicates(tmp_path):
    root = shared_path("covid-qu-ex-train")
    assert main(["index", str(root), "--out", str(tmp_path / "m.csv"), "--quiet", "--split", "0.8,0.2"]) == 0
    df = pd.read_csv(tmp_path / "m.csv", keep_default_na=False)
    assert len(df) == 900 and df["group"].nunique() == 900
    assert set(df["split"]) == {"train", "val"}

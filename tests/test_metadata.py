"""Issue 22, data layer: metadata joined into the manifest, normalised, and patient-level splits."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.cli import main
from covidcxr.data.manifest import COLUMNS, build_manifest, read_manifest
from covidcxr.data.metadata import (coverage, crossing_patients, normalise_age, normalise_sex, normalise_view,
                                    patient_overlap)
from covidcxr.data.metatable import match_rows
from covidcxr.data.splits import split_groups, stratified_group_split
from covidcxr.errors import DataError
from tests.conftest import random_cxr, shared_path, write_png


def test_normalisers():
    assert [normalise_sex(v)[0] for v in ("female", "F", " f ", "Woman", "MALE", "m", "O", "", "n/a", "xyz")] == \
        ["F", "F", "F", "F", "M", "M", "other", "unknown", "unknown", "unknown"]
    assert normalise_sex("xyz")[1] is False and normalise_sex("")[1] is True
    views = ("PA", "pa", "AP Supine", "AP portable", "antero-posterior", "LL", "RL", "LAT", "Left Lateral",
             "PA LLD", "LAO", "", "frontal")
    assert [normalise_view(v)[0] for v in views] == ["PA", "PA", "AP", "AP", "AP", "LATERAL", "LATERAL", "LATERAL",
                                                     "LATERAL", "other", "other", "unknown", "unknown"]
    ages = ("45", "45Y", "045Y", "45 years", "45.5", "006M", "002W", "010D", "6 months", "", "abc", "-3", "131",
            "45,5")
    assert [normalise_age(v)[0] for v in ages] == ["45", "45", "45", "45", "45.5", "0.5", "0.038", "0.027", "0.5",
                                                   "unknown", "unknown", "unknown", "unknown", "45.5"]
    assert [normalise_age(v)[1] for v in ("abc", "-3", "131", "", "130")] == [False, False, False, True, True]


def _patients(n_patients=400, seed=0):
    """2,000 films of 400 patients (1-12 each), labels per patient, plus near-duplicate pairs across patients."""
    rng = np.random.default_rng(seed)
    films = np.ones(n_patients, int)
    while films.sum() < 2000:
        i = rng.integers(n_patients)
        films[i] += films[i] < 12
    pids = np.repeat([f"P{i:04d}" for i in range(n_patients)], films)
    labels = np.repeat(rng.choice(["COVID", "Normal", "Viral"], n_patients), films).tolist()
    dup = np.arange(len(pids))
    for a, b in rng.integers(0, len(pids), (60, 2)):      # near-duplicates, often of two patients
        dup[max(a, b)] = dup[min(a, b)]
    for i in range(len(dup)):                           # roots are the smallest member, as dedup gives
        while dup[dup[i]] != dup[i]:
            dup[i] = dup[dup[i]]
    return pids.tolist(), labels, dup


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_no_patient_crosses_a_split(seed):
    pids, labels, dup = _patients(seed=seed)
    assert len(pids) == 2000 and len(set(pids)) == 400 and pd.Series(pids).value_counts().max() <= 12
    groups = split_groups(dup, pids)
    split = stratified_group_split(labels, groups.tolist(), (0.7, 0.15, 0.15), seed)
    df = pd.DataFrame({"patient_id": pids, "split": split, "dup": dup})
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert df.groupby("dup")["split"].nunique().max() == 1       # and every near-duplicate with them
    assert crossing_patients(df) == []
    frac = df["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.05 and abs(frac["test"] - 0.15) < 0.05
    # duplicates-only grouping (the old behaviour) lets patients cross
    old = stratified_group_split(labels, dup.tolist(), (0.7, 0.15, 0.15), seed)
    assert len(crossing_patients(df.assign(split=old))) > 100


def test_split_groups_union_and_empty_ids():
    #            0    1    2    3    4   5   6
    pids = ["a", "b", "a", "", "", "c", "b"]
    dup = [0, 1, 2, 3, 3, 1, 6]          # 3-4 duplicates; 5 is a copy of 1 (patients b and c)
    assert split_groups(dup, pids).tolist() == [0, 1, 0, 3, 3, 1, 1]


def test_patient_overlap():
    train = pd.DataFrame({"patient_id": ["p1", "p2", "", "p3"]})
    ev = pd.DataFrame({"patient_id": ["p3", "", "p9", "p1", "p1"]})
    assert patient_overlap(train, ev) == ["p1", "p3"]
    assert patient_overlap(train, pd.DataFrame({"patient_id": ["", ""]})) == []
    assert patient_overlap(train, pd.DataFrame({"path": ["x"]})) == []


def test_match_rows_by_name_relative_absolute_and_stem(tmp_path):
    root = str(tmp_path / "d")
    paths = [f"{root}/COVID/images/COVID-1.png", f"{root}/Normal/images/Normal-1.png", f"{root}/Normal/images/x.png"]
    row_of, unmatched = match_rows(["Normal/images/Normal-1.png", "NORMAL-1x", f"{root}/COVID/images/COVID-1.png",
                                    "wrapper/Normal/images/x.png", "covid-9"], paths, [root], "m.csv")
    assert row_of == [2, 0, 3] and unmatched == [(3, "NORMAL-1x"), (6, "covid-9")]
    assert match_rows(["NORMAL-1"], paths, [root], "m.csv")[0] == [-1, 0, -1]     # Kaggle sheets: no extension
    with pytest.raises(DataError, match=r"rows 2 and 4 both match .*Normal-1.png"):
        match_rows(["Normal-1.png", "COVID-1.png", "Normal/images/Normal-1.png"], paths, [root], "m.csv")
    twice = paths + [f"{root}/COVID/images/x.png"]
    with pytest.raises(DataError, match=r"row 2 names 'x.png', which matches 2 images"):
        match_rows(["x.png"], twice, [root], "m.csv")


@pytest.fixture
def tiny(tmp_path):
    """12 PNGs, 2 classes, 6 patients of 2 films; its metadata table (odd spellings, bad ages)."""
    root = tmp_path / "data"
    rows = []
    for i in range(12):
        cls = ("COVID", "Normal")[i % 2]
        write_png(root / cls / f"{cls}-{i}.png", random_cxr(100 + i, 48))
        rows.append({"Image Index": f"{cls}-{i}.png", "Patient ID": f"P{i // 2}", "View Position": "AP Supine",
                     "Patient Gender": "female" if i < 6 else "M", "Patient Age": ("045Y", "abc", "-3", "6 months")[i % 4],
                     "Hospital": "A" if i < 8 else "B"})
    rows = rows[1:] + [{"Image Index": "ghost.png", "Patient ID": "P99"}]   # COVID-0 unmatched; a row without image
    meta = tmp_path / "meta.csv"
    pd.DataFrame(rows).to_csv(meta, index=False)
    return root, meta


def test_index_with_metadata_end_to_end(tiny, tmp_path, capsys):
    root, meta = tiny
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = tmp_path / "m.csv"
    assert main(["index", str(root), "--out", str(out), "--quiet", "--metadata", str(meta), "--split", "0.5,0.5"]) == 0
    text = capsys.readouterr().out
    assert "11 images matched; 1 rows match no image; 1 images match no row" in text
    assert "row 13 'ghost.png'" in text and "COVID-0.png" in text
    assert "6 age value(s) not understood (e.g. '-3', 'abc'): stored as unknown" in text
    assert "Patients: 6 (11 of 12 images" in text
    df = read_manifest(out)
    assert list(pd.read_csv(out, nrows=0).columns) == COLUMNS
    df["name"] = df["path"].str.rsplit("/", n=1).str[-1]
    row = df.set_index("name")
    assert row.loc["COVID-0.png", ["patient_id", "sex", "age", "view", "site"]].tolist() == \
        ["", "unknown", "unknown", "unknown", "unknown"]
    assert row.loc["Normal-1.png", ["patient_id", "sex", "age", "view", "site", "manufacturer"]].tolist() == \
        ["P0", "F", "unknown", "AP", "A", "unknown"]
    assert row.loc["COVID-4.png", "age"] == "45" and row.loc["Normal-11.png", ["age", "sex", "site"]].tolist() == \
        ["0.5", "M", "B"]
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert (df.groupby("patient_id")["group"].nunique() == 1).all()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before     # nothing written into the data


def test_metadata_columns_flag_and_bad_inputs(tiny, tmp_path, capsys):
    root, meta = tiny
    args = ["index", str(root), "--quiet", "--out"]
    assert main(args + [str(tmp_path / "a.csv"), "--metadata", str(meta),
                        "--metadata-columns", "patient=Hospital,file=Image Index"]) == 0
    assert set(read_manifest(tmp_path / "a.csv")["patient_id"]) == {"", "A", "B"}
    capsys.readouterr()
    assert main(args + [str(tmp_path / "b.csv"), "--metadata", str(meta), "--metadata-columns", "view=Projection"]) == 2
    err = capsys.readouterr().err
    assert "--metadata-columns view=Projection" in err and "no column 'Projection'" in err and "'View Position'" in err
    assert main(args + [str(tmp_path / "b.csv"), "--metadata", str(meta), "--metadata-columns", "colour=x"]) == 2
    assert "KEY=COLUMN" in capsys.readouterr().err
    xlsx = tmp_path / "COVID.metadata.xlsx"
    xlsx.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert main(args + [str(tmp_path / "b.csv"), "--metadata", str(xlsx)]) == 2
    err = capsys.readouterr().err
    assert "COVID.metadata.xlsx" in err and "save it as CSV" in err and len(err.strip().splitlines()) == 1
    binary = tmp_path / "meta.csv.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00" + b"\0" * 50)
    assert main(args + [str(tmp_path / "b.csv"), "--metadata", str(binary)]) == 2
    assert "not CSV" in capsys.readouterr().err
    nofile = tmp_path / "nofile.csv"
    nofile.write_text("who,what\na,b\n")
    assert main(args + [str(tmp_path / "b.csv"), "--metadata", str(nofile)]) == 2
    assert "no file column" in capsys.readouterr().err
    dup = tmp_path / "dup.csv"
    dup.write_text("filename,sex\nCOVID-2.png,F\nNormal-3.png,M\nCOVID/COVID-2.png,M\n")
    assert main(args + [str(tmp_path / "b.csv"), "--metadata", str(dup)]) == 2
    assert "rows 2 and 4 both match" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "b.csv"), "--metadata-columns", "sex=x"]) == 2
    assert not (tmp_path / "b.csv").exists()


def _write_dicom(path, age="045Y", patient="PX1", view="PA", sex="F"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    arr = random_cxr(len(str(path)), 32).astype(np.uint16) * 16
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PatientID, ds.PatientAge, ds.PatientSex, ds.ViewPosition = patient, age, sex, view
    ds.StudyInstanceUID, ds.InstitutionName, ds.Manufacturer = "1.2.3." + patient[2:], "Site Z", "Acme"
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")   # the planted bad age
def test_dicom_tags_fill_the_manifest(tmp_path):
    root = tmp_path / "d"
    _write_dicom(root / "COVID" / "a.dcm", age="045Y", patient="PX1")
    _write_dicom(root / "COVID" / "b.dcm", age="006M", patient="PX1", view="LL", sex="M")
    _write_dicom(root / "Normal" / "c.dcm", age="0A1Y", patient="PX2", view="AP")
    write_png(root / "Normal" / "d.png", random_cxr(7, 32))
    df, report = build_manifest(root, (0.5, 0.5), seed=0, progress=False)
    df = df.assign(name=df["path"].str.rsplit("/", n=1).str[-1]).set_index("name")
    assert df.loc["a.dcm", ["patient_id", "study_id", "view", "sex", "age", "site", "manufacturer"]].tolist() == \
        ["PX1", "1.2.3.1", "PA", "F", "45", "Site Z", "Acme"]
    assert df.loc["b.dcm", ["view", "sex", "age"]].tolist() == ["LATERAL", "M", "0.5"]
    assert df.loc["c.dcm", "age"] == "unknown" and report.metadata.invalid == {"age": ["0A1Y"]}
    assert df.loc["d.png", ["patient_id", "view"]].tolist() == ["", "unknown"]
    assert df.loc["a.dcm", "split"] == df.loc["b.dcm", "split"] and df.loc["a.dcm", "group"] == df.loc["b.dcm", "group"]
    assert report.metadata.source == "DICOM tags of 3 file(s)"


def _qu_ex(tmp_path):
    root = tmp_path / "q"
    for split in ("Train", "Val"):
        for cls in ("COVID-19", "Normal"):
            for i in range(3):
                write_png(root / split / cls / "images" / f"{cls}_{split}_{i}.png",
                          random_cxr(hash((split, cls, i)) % 1000, 48))
    meta = tmp_path / "meta.csv"
    names = [p.name for p in sorted(root.rglob("*.png"))]
    meta.write_text("file,patient\n" + "".join(f"{n},{'shared' if n in ('COVID-19_Train_0.png', 'COVID-19_Val_1.png') else n}\n"
                                            for n in names))
    return root, meta


def test_patients_crossing_the_datasets_own_split(tmp_path, capsys):
    root, meta = _qu_ex(tmp_path)
    out = tmp_path / "m.csv"
    assert main(["index", str(root), "--out", str(out), "--quiet", "--metadata", str(meta), "--strict"]) == 1
    assert not out.exists()
    assert main(["index", str(root), "--out", str(out), "--quiet", "--metadata", str(meta)]) == 0
    text = capsys.readouterr().out
    assert "WARNING: 1 patients cross the dataset's own splits" in text and "patient shared: train 1, val 1" in text
    assert main(["audit", str(out), "--quiet", "--json", str(tmp_path / "a.json")]) == 0
    assert "Patients crossing splits (leakage): 1" in capsys.readouterr().out
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["crossing_patients"] == [{"patient_id": "shared", "splits": {"train": 1, "val": 1}}]
    assert a["metadata"]["patients"] == 11 and a["metadata"]["with_patient_id"] == 12 and a["crossing_groups"] == []
    assert main(["audit", str(out), "--quiet", "--strict"]) == 1


def test_old_manifest_gets_the_metadata_columns(tmp_path):
    root = tmp_path / "d"
    for i in range(2):
        write_png(root / "a" / f"{i}.png", random_cxr(i, 32))
    old = tmp_path / "old.csv"
    old.write_text(f"path,label,split,group\n{root}/a/0.png,a,train,0\n{root}/a/1.png,a,val,1\n")
    df = read_manifest(old)
    assert df["patient_id"].tolist() == ["", ""] and df["sex"].tolist() == ["unknown"] * 2
    assert df["dup_group"].tolist() == [0, 1] and coverage(df)["patients"] == 0


def test_real_kaggle_sample_with_its_file_names_as_metadata(tmp_path):
    root = shared_path("cxr-sample")
    man = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    col = next(c for c in ("image", "path", "file") if c in man.columns)
    meta = tmp_path / "meta.csv"   # the Kaggle sheets' form: FILE NAME without extension, upper-case NORMAL
    pd.DataFrame({"FILE NAME": [n.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("Normal", "NORMAL")
                                for n in man[col]], "FORMAT": "PNG"}).to_csv(meta, index=False)
    df, report = build_manifest(root, (0.7, 0.15, 0.15), progress=False, metadata=meta)
    assert report.metadata.matched == len(df) == 350 and not report.metadata.unmatched_rows
    assert report.metadata.columns == {} and (df["sex"] == "unknown").all()


def test_synth_copy_runs_without_metadata_unchanged(synth_copy, tmp_path):
    shutil.rmtree(synth_copy / "Normal" / "masks")
    df, report = build_manifest(synth_copy, (0.5, 0.25, 0.25), seed=1, progress=False)
    assert report.metadata.source == "none" and (df["group"] == df["dup_group"]).all()
    assert (df["patient_id"] == "").all() and (df["age"] == "unknown").all()

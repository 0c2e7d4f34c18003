import numpy as np
import pytest

from covidcxr.data.layouts import detect_layout, scan_dataset
from covidcxr.errors import DataError
from tests.conftest import random_cxr, write_png


def test_kaggle_layout_with_partial_masks(tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"  # wrapper folder is descended into
    for cls in ("COVID", "Viral Pneumonia"):
        for i in range(3):
            write_png(root / cls / "images" / f"{cls}-{i}.png", random_cxr(i))
    for i in range(3):
        write_png(root / "Viral Pneumonia" / "masks" / f"Viral Pneumonia-{i}.png", np.zeros((32, 32), np.uint8))
    write_png(root / "Viral Pneumonia" / "masks" / "orphan.png", np.zeros((32, 32), np.uint8))
    (tmp_path / "COVID-19_Radiography_Dataset" / "COVID.metadata.xlsx").write_text("x")
    scan = scan_dataset(tmp_path)
    assert scan.layout == "kaggle" and scan.classes == ["COVID", "Viral Pneumonia"]
    assert len(scan.records) == 6
    assert sum(bool(r.lung_mask) for r in scan.records) == 3
    assert all(not r.lung_mask for r in scan.records if r.label == "COVID")
    assert any("orphan.png" in p.path and "no matching image" in p.reason for p in scan.problems)


def test_covid_qu_ex_layout_keeps_split(tmp_path):
    root = tmp_path / "Infection Segmentation Data"
    for split in ("Train", "Val", "Test"):
        for cls in ("COVID-19", "Normal"):
            name = f"{cls} (1).png"
            write_png(root / split / cls / "images" / name, random_cxr(hash((split, cls)) % 100))
            if split != "Test":
                write_png(root / split / cls / "lung masks" / name, np.zeros((64, 64), np.uint8))
                write_png(root / split / cls / "infection masks" / name, np.zeros((64, 64), np.uint8))
    scan = scan_dataset(tmp_path)
    assert scan.layout == "covid-qu-ex"
    assert sorted({r.official_split for r in scan.records}) == ["test", "train", "val"]
    tr = [r for r in scan.records if r.official_split == "train"]
    assert all(r.lung_mask and r.infection_mask for r in tr)
    assert all(not r.lung_mask for r in scan.records if r.official_split == "test")


def test_folder_per_class_and_empty_class(tmp_path):
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(2):
            write_png(tmp_path / cls / "sub" / f"{i}.jpeg", random_cxr(i))
    (tmp_path / "COVID").mkdir()
    scan = scan_dataset(tmp_path)
    assert scan.layout == "folders" and scan.classes == ["NORMAL", "PNEUMONIA"]
    assert any("COVID" in p.path and "no images" in p.reason for p in scan.problems)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset layout"):
        detect_layout(tmp_path)
    write_png(tmp_path / "only" / "a.png", random_cxr(0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="only one class"):
        scan_dataset(tmp_path)

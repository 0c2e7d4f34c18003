"""Real dataset download through kagglehub, failing fast and helpfully offline."""
from __future__ import annotations

import shlex
import shutil
import socket
from pathlib import Path

from covidcxr.errors import DataError

DATASETS = {
    "covid19-radiography": {
        "handle": "tawsifurrahman/covid19-radiography-database",
        "page": "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
        "layout": "COVID/, Lung_Opacity/, Normal/, Viral Pneumonia/ each with images/ and masks/",
    },
    "covid-qu-ex": {
        "handle": "anasmohammedtahir/covidqu",
        "page": "https://www.kaggle.com/datasets/anasmohammedtahir/covidqu",
        "layout": "'Lung Segmentation Data' and 'Infection Segmentation Data', each "
                  "Train|Val|Test/<Class>/{images, lung masks, infection masks}",
    },
}


def _reachable(host: str = "www.kaggle.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def manual_instructions(name: str, out: Path) -> str:
    d = DATASETS[name]
    return (f"Download it by hand from {d['page']} (Kaggle account needed), unzip it and put it in "
            f"{out} so that it holds {d['layout']}. Then run: {shlex.join(['python', '-m', 'covidcxr.data', 'index', str(out)])}")


def download(name: str, out: str | Path, overwrite: bool = False) -> Path:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and is not empty; pass --overwrite or choose another --out.")
    if not _reachable():
        raise DataError(f"cannot reach kaggle.com (offline?). {manual_instructions(name, out)}")
    try:
        import kagglehub  # optional: only the download command needs it (and the network)

        cached = Path(kagglehub.dataset_download(DATASETS[name]["handle"]))
    except Exception as exc:
        raise DataError(f"kagglehub download of {DATASETS[name]['handle']} failed ({exc}). "
                        f"Set KAGGLE_USERNAME/KAGGLE_KEY or: {manual_instructions(name, out)}") from exc
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cached, out, dirs_exist_ok=True)
    return out

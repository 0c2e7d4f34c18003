import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The input cache of every run in the suite goes to one throw-away folder (not ~/.cache).
os.environ.setdefault("COVIDCXR_CACHE", tempfile.mkdtemp(prefix="covidcxr-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# Subprocesses started from tmp folders must import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))


def shared_path(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"../shared/data/{name} not present (runs in CI)")
    return p


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from covidcxr.data.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", per_class=8, size=64, seed=3,
                                   progress=False)


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(synth_dir, dst)
    return dst


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib Figure saved during the test, kept for inspection after the real save."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def random_cxr(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    return (np.clip(ndimage.gaussian_filter(rng.random((size, size)), 3) * 4 - 1.5, 0, 1) * 255).astype(np.uint8)

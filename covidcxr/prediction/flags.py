"""``predict --calibrated``: the temperature found beside the model. ``predict --operating-point``: the
``flag_<class>`` column (1 when p(class) >= the threshold, else 0), from the operating_point.json ``covidcxr.evaluate --operating-point`` saved beside the model
(bare flag), a given FILE, or a fixed ``CLASS:threshold=T``. The flag is computed on the model's own
(uncalibrated) probability, as the threshold was chosen, with or without ``--calibrated``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from covidcxr import operating as OP
from covidcxr.artifacts import CALIBRATION, OPERATING_POINT
from covidcxr.calibration import load_temperature
from covidcxr.errors import ConfigError


def _spec_like(value: str) -> bool:
    return ":" in value or "=" in value or value.strip().lower() == "youden"


def _file(value: str, model: str, root: Path) -> Path:
    """``value`` itself, or (bare) the operating_point.json beside the model, searched like calibration.json."""
    if value:
        if Path(value).suffix.lower() != ".json":
            raise ConfigError(f"--operating-point {value}: not a .json file nor CLASS:threshold=T (a bare "
                              f"--operating-point, for the file beside the model, goes after the inputs).")
        cands = [Path(value)]
    else:
        home = Path(model) if Path(model).is_dir() else Path(model).parent
        cands = [d / OPERATING_POINT for d in dict.fromkeys((home, root, home.parent, home.parent.parent))]
    path = next((c for c in cands if c.is_file()), None)
    if path is None:
        raise ConfigError(f"--operating-point: {' / '.join(map(str, cands))} not found. Run python -m "
                          f"covidcxr.evaluate --operating-point on this model first, or pass --operating-point FILE "
                          f"or CLASS:threshold=T.")
    return path


def resolve(value: str, model: str, root: Path, classes: list[str]) -> dict:
    """{"class", "threshold", "column", "source"} of the ``--operating-point`` value ('' when bare)."""
    if value and not Path(value).exists() and _spec_like(value):
        spec = OP.parse_spec(value, classes)
        if spec.chosen:
            raise ConfigError(f"--operating-point {value}: predict has no labels to choose a threshold on; choose it "
                              f"with python -m covidcxr.evaluate --operating-point {value}, then pass its "
                              f"operating_point.json, or fix it: {spec.cls}:threshold=T.")
        cls, t, source = spec.cls, float(spec.value), spec.text
    else:
        path = _file(value, model, root)
        (cls, t), source = OP.load(path, classes), str(path)
    return {"class": cls, "threshold": t, "column": OP.flag_column(cls), "source": source}


def add_flags(rows: list[dict], probs: np.ndarray, op: dict, classes: list[str]) -> None:
    """Set ``op['column']`` of each row from the uncalibrated ``probs`` (one row each)."""
    k = classes.index(op["class"])
    for row, p in zip(rows, np.asarray(probs, np.float64)[:, k]):
        row[op["column"]] = int(p >= op["threshold"])


def find_temperature(model: str, calibration: str | None, root: Path) -> float:
    """The temperature of ``--calibration FILE`` or of the calibration.json beside the model (its folder, the
    located root, and the two folders above)."""
    home = Path(model) if Path(model).is_dir() else Path(model).parent
    cands = [Path(calibration)] if calibration else \
        [d / CALIBRATION for d in dict.fromkeys((home, root, home.parent, home.parent.parent))]
    path = next((c for c in cands if c.exists()), None)
    if path is None:
        raise ConfigError(f"--calibrated: {' / '.join(map(str, cands))} not found. Run python -m covidcxr.evaluate "
                          f"on this model first (it fits the temperature on the validation split), or pass "
                          f"--calibration FILE.")
    try:
        t = load_temperature(path)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--calibrated: {path} is not a calibration file ({exc}).") from exc
    print(f"calibrated: temperature {t:.4f} from {path}")
    return t

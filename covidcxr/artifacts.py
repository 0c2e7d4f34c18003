"""Run and export folders: their file names, the model card, and ``locate(path)``.

A **run** (``experiments/runs/<name>/``, written by ``covidcxr.train``)::

    config.json  manifest.csv  model_card.json  history.csv  best.keras  metrics.json  curves.png
    state.json + resume.npz (continue with --resume; a finished run's resume.npz is removed unless
    --keep-resume-state)  skipped.csv  train_fingerprints.npz  tensorboard/
    lung_segmenter/ + crop_masks/ (lung-cropped classifiers)
    MODEL_CARD.md + model_card_facts.json (``covidcxr.modelcard``; exports and evaluations write them too)

An **export** (``saved_models/<name>/``, written by ``covidcxr.export``)::

    model.keras  model_card.json  train_fingerprints.npz  serving/1/ (TF SavedModel)  [lung_segmenter/]
    README.md (its Hugging Face model card)  [model.onnx (--format onnx)]

(described for users in saved_models/README.md; ``covidcxr.load_model`` loads either folder's Keras model.)

``locate`` accepts either folder, a ``.keras`` file beside a model card, or a bare SavedModel
folder (``serving/1`` or its parent's ``serving``), and says which it found.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from covidcxr import hub
from covidcxr.errors import DataError, RunExistsError

CONFIG = "config.json"
MANIFEST = "manifest.csv"
CARD = "model_card.json"
LEGACY_LABELS = "labels.json"
HISTORY = "history.csv"
BEST = "best.keras"
STATE = "state.json"
RESUME = "resume.npz"
METRICS = "metrics.json"
EXPORT_STATUS = "export_status.json"   # in a run folder: where its export went, or why it failed
CURVES = "curves.png"
SKIPPED = "skipped.csv"
FINGERPRINTS = "train_fingerprints.npz"
TENSORBOARD = "tensorboard"
SEGMENTER_DIR = "lung_segmenter"
CROP_MASKS = "crop_masks"
EXPORT_MODEL = "model.keras"
ONNX_MODEL = "model.onnx"          # export --format onnx: the Keras model's contract, for ONNX Runtime
SERVING = Path("serving") / "1"
CALIBRATION = "calibration.json"
OPERATING_POINT = "operating_point.json"   # evaluate --operating-point: one class's threshold
INPUT_FORMAT = "gray255"  # models take uint8-range grayscale [B, S, S, 1]


class LungCrop(enum.StrEnum):
    """How a classifier's input is cropped to the lungs (``lung_crop`` of model_card.json, stored as its
    value; false for ``NONE``)."""
    NONE = ""
    GIVEN = "given"     # the dataset's own lung masks, given with each image
    MODEL = "model"     # a lung segmenter shipped with the model (lung_segmenter/)

    @classmethod
    def of_config(cls, value: str) -> "LungCrop":
        """From a run's ``--lung-crop`` ('' | given | PATH of a lung segmenter)."""
        return cls.NONE if not value else cls.GIVEN if value == cls.GIVEN.value else cls.MODEL


@dataclass
class ModelCard:
    """What a model is: enough to preprocess its inputs and read its outputs anywhere."""

    classes: list[str]
    arch: str
    task: str = "classify"              # classify | segment | multitask
    image_size: int = 224
    normalization: str = "unit"         # applied inside the model (BackboneInput)
    contrast: str = "none"
    lung_crop: LungCrop = LungCrop.NONE
    target: str | None = None           # segment/multitask: lung | infection
    input_format: str = INPUT_FORMAT
    backend: str = ""                   # Keras backend it was trained on
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.lung_crop = LungCrop(self.lung_crop)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ModelCard":
        folder = Path(folder)
        path = folder / CARD
        if not path.exists():
            if (folder / LEGACY_LABELS).exists():
                raise DataError(f"{folder}: made by an older covidcxr (labels.json, models that take normalised RGB); "
                                f"retrain it with this version.")
            raise DataError(f"{folder}: no {CARD}; not a covidcxr run or export folder.")
        doc = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass
class Located:
    """A model found on disk. ``kind``: run | export | keras | savedmodel."""

    kind: str
    root: Path                     # the folder holding the card
    card: ModelCard
    keras_path: Path | None = None
    savedmodel_path: Path | None = None

    @property
    def run_dir(self) -> Path | None:
        return self.root if self.kind == "run" else None

    @property
    def fingerprints_path(self) -> Path | None:
        p = self.root / FINGERPRINTS
        return p if p.exists() else None

    @property
    def config(self) -> dict | None:
        p = self.root / CONFIG
        return json.loads(p.read_text()) if p.exists() else None

    @property
    def manifest_path(self) -> Path | None:
        p = self.root / MANIFEST
        return p if p.exists() else None

    @property
    def onnx_path(self) -> Path | None:
        p = self.root / ONNX_MODEL
        return p if p.exists() else None

    @property
    def segmenter_dir(self) -> Path | None:
        p = self.root / SEGMENTER_DIR
        return p if (p / EXPORT_MODEL).exists() else None


def _is_savedmodel(p: Path) -> bool:
    return (p / "saved_model.pb").exists()


def locate(path: str | Path) -> Located:
    """Find the model at ``path`` (run dir, export dir, .keras file or SavedModel dir, or ``hf://OWNER/NAME[@REV]``:
    an export folder on the Hugging Face Hub, downloaded once into its cache by ``covidcxr.hub``)."""
    p = hub.resolve(path) if hub.is_handle(path) else Path(path)
    if not p.exists():
        raise DataError(f"--model {p}: no such file or folder.")
    if p.is_file():
        if p.suffix != ".keras":
            raise DataError(f"--model {p}: not a .keras file, run folder or export folder.")
        card = ModelCard.load(p.parent)
        kind = "run" if (p.parent / CONFIG).exists() else "keras"
        return Located(kind, p.parent, card, keras_path=p)
    if _is_savedmodel(p):  # serving/1 (or any version folder) of an export
        home = next((h for h in (p, p.parent, p.parent.parent) if (h / CARD).exists() or (h / LEGACY_LABELS).exists()),
                    None)
        if home is None:
            raise DataError(f"--model {p}: a SavedModel without a {CARD} beside it (or two folders up); "
                            f"cannot tell its classes.")
        return Located("savedmodel", home, ModelCard.load(home), savedmodel_path=p)
    if (p / BEST).exists() or (p / CONFIG).exists():
        card = ModelCard.load(p)
        if not (p / BEST).exists():
            raise DataError(f"--model {p}: this run has no {BEST} yet (it saved no checkpoint).")
        return Located("run", p, card, keras_path=p / BEST, savedmodel_path=_serving(p))
    if (p / EXPORT_MODEL).exists() or (p / ONNX_MODEL).exists():   # an ONNX-only copy runs with --engine onnx
        keras_path = p / EXPORT_MODEL if (p / EXPORT_MODEL).exists() else None
        return Located("export", p, ModelCard.load(p), keras_path=keras_path, savedmodel_path=_serving(p))
    if (p / "serving").is_dir():
        sm = _serving(p)
        if sm is not None:
            return Located("savedmodel", p, ModelCard.load(p), savedmodel_path=sm)
    raise DataError(f"--model {p}: not a run folder ({BEST}), an export folder ({EXPORT_MODEL}) or a SavedModel.")


def _serving(folder: Path) -> Path | None:
    """The newest numbered SavedModel under ``folder/serving``."""
    base = folder / "serving"
    if not base.is_dir():
        return None
    versions = sorted((d for d in base.iterdir() if d.is_dir() and d.name.isdigit() and _is_savedmodel(d)),
                      key=lambda d: int(d.name))
    return versions[-1] if versions else None


def check_free(out: str | Path, overwrite: bool) -> None:
    """Refuse to write into an existing, non-empty output folder unless ``overwrite``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or another --out.")


@contextlib.contextmanager
def staged(out: str | Path, overwrite: bool = False):
    """Yield ``OUT.partial`` to write into; it becomes ``OUT`` only when the block completes, and is
    deleted when it fails (Ctrl-C included), so a half-written output is never left under ``OUT``."""
    out = Path(out)
    check_free(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def report_skipped(folder: str | Path, skipped: list[tuple[str, str]], log=print) -> None:
    """The one report of files left out: all of them in ``folder/skipped.csv`` (path, reason), their count and
    the first five on the console. Nothing is written when nothing was skipped."""
    if not skipped:
        return
    path = Path(folder) / SKIPPED
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    log(f"WARNING: {len(skipped)} file(s) left out (all listed in {path}, each with the reason), e.g.:")
    for p, reason in skipped[:5]:
        log(f"  - {p}: {reason.split(': ', 1)[-1] if reason.startswith(p) else reason}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary name, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)

"""Exports for serving: ``<out>/serving/1`` (TF SavedModel taking image bytes), ``model.keras``,
``model_card.json``, the training fingerprints (for the overlap guard) and, for lung-cropped
classifiers, their segmenter.

Written into ``OUT.partial``; the SavedModel is reloaded and must reproduce the Keras model on
real files (the same decoded pixels through both) before the folder is renamed to ``OUT``.
The SavedModel is written by TensorFlow: a run trained on JAX or PyTorch is exported by
running ``python -m covidcxr.export`` under the TensorFlow backend (``export_run`` does it).
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import keras

from covidcxr import artifacts as A
from covidcxr.errors import ConfigError, CovidCXRError

FORMATS = ("savedmodel", "onnx")    # export --format: the SavedModel (default), model.onnx, or both


def parse_formats(text: str) -> tuple[str, ...]:
    """``savedmodel``, ``onnx`` or ``savedmodel,onnx`` -> the formats, in FORMATS order."""
    asked = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    bad = [f for f in asked if f not in FORMATS]
    if bad or not asked:
        raise ConfigError(f"--format {text}: write one or more of {', '.join(FORMATS)}, comma-separated.")
    return tuple(f for f in FORMATS if f in asked)


def export_run(src: str | Path, out: str | Path, overwrite: bool = False, checks: list[str] | None = None,
               log=print, formats: tuple[str, ...] = ("savedmodel",)) -> Path | None:
    """Export ``src`` (run, export or .keras) to ``out``; under another backend, via a TensorFlow subprocess."""
    if keras.backend.backend() == "tensorflow":
        # TensorFlow under another backend is optional (a JAX GPU machine may have none), so the
        # SavedModel writer, which imports it, loads only here, where TensorFlow is the backend.
        from covidcxr.exporting.savedmodel import export_model

        return export_model(A.locate(src), out, overwrite, checks, log, formats)
    if importlib.util.find_spec("tensorflow") is None:
        later = shlex.join(["python", "-m", "covidcxr.export", str(src), "--out", str(out),
                            "--format", ",".join(formats)])
        log(f"NOTE: no export written: the SavedModel needs TensorFlow, which is not installed here. Export later "
            f"with: pip install tensorflow; KERAS_BACKEND=tensorflow {later}")
        return None
    cmd = [sys.executable, "-m", "covidcxr.export", str(src), "--out", str(out)] + (["--overwrite"] if overwrite else [])
    cmd += [a for c in (checks or []) for a in ("--check", c)] + ["--format", ",".join(formats)]
    log(f"exporting under the TensorFlow backend: {shlex.join(cmd)}")
    r = subprocess.run(cmd, env={**os.environ, "KERAS_BACKEND": "tensorflow"}, capture_output=True, text=True)
    if r.returncode:
        raise CovidCXRError(f"export failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    log(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exported {out}")
    return Path(out)

"""covidcxr: a Keras 3 toolkit for chest X-ray research.

Importing the package is cheap (NumPy, never Keras): Keras and its backend are imported only by
the modules that need them (models, training, inference, evaluation, export) and by ``load_model``.

``covidcxr.load_model(path)`` loads a trained model in Python, on any backend: a run folder, an
export folder or a ``.keras`` file.
"""
from __future__ import annotations

from pathlib import Path

from covidcxr.artifacts import locate
from covidcxr.errors import DataError
from covidcxr.inference import load_keras

__version__ = "0.2.0"


def load_model(path: str | Path):
    """The Keras model of a run folder (its ``best.keras``), an export folder (``model.keras``) or a
    ``.keras`` file, not compiled. Registers covidcxr's own layers first (``BackboneInput``, the
    foundation encoders' token layers, losses, metrics), without which ``keras.saving.load_model``
    raises TypeError. The model takes uint8-range grayscale ``[B, S, S, 1]`` (0..255, float or uint8;
    ``S`` and the classes are in the ``model_card.json`` beside it) and normalises for its backbone
    itself; ``covidcxr.inference.Predictor`` decodes and resizes files for it."""
    p = Path(path)
    if p.is_dir():
        found = locate(p)
        if found.keras_path is None:
            raise DataError(f"{p}: a bare SavedModel has no Keras model; load it with tf.saved_model.load, or pass "
                            f"the export folder that holds model.keras.")
        p = found.keras_path
    return load_keras(p)

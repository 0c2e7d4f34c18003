"""covidcxr: a Keras 3 toolkit for chest X-ray research.

Importing the package is cheap (NumPy, never Keras): ``load_model`` is the one name defined here
and it imports ``covidcxr.inference`` (and with it Keras) when first called. That lazy import is the
one function-level import between covidcxr modules (the exemption in ``covidcxr/_layers.py``).

``covidcxr.load_model(path)`` loads a trained model in Python, on any backend: a run folder, an
export folder or a ``.keras`` file.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.2.0"


def load_model(path: str | Path):
    """The Keras model of a run folder (its ``best.keras``), an export folder (``model.keras``) or a
    ``.keras`` file, not compiled. Registers covidcxr's own layers first (``BackboneInput``, the
    foundation encoders' token layers, losses, metrics), without which ``keras.saving.load_model``
    raises TypeError. The model takes uint8-range grayscale ``[B, S, S, 1]`` (0..255, float or uint8;
    ``S`` and the classes are in the ``model_card.json`` beside it) and normalises for its backbone
    itself; ``covidcxr.inference.Predictor`` decodes and resizes files for it."""
    from covidcxr import inference  # the facade: `import covidcxr` stays free of Keras

    return inference.load_model(path)

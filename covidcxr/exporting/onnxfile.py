"""``model.onnx`` (``export --format onnx``, the optional extra ``[onnx]``): the Keras model alone, with the
Keras model's own contract (input ``image``: float32 uint8-range ``[B, S, S, 1]``, any batch size; outputs
as the Keras model's: the class probabilities, the mask, or ``label`` and ``mask``), preprocessed on the
host by ``covidcxr.data`` exactly as for the Keras model, and ``model_card.json`` beside it.

Written with Keras's ``model.export(format="onnx")`` (tf2onnx under the TensorFlow backend), then reloaded
in ONNX Runtime and compared with the Keras model on the decoded pixels of real files (the export check's
images) before it is kept: the largest output difference must be within ``check.TOLERANCE``. A
lung-cropped classifier gets ``lung_segmenter/model.onnx`` too, and the crop masks it gives are compared
pixel by pixel. A model that does not convert, or converts to a graph that does not reproduce Keras, is
refused with the reason, and nothing is kept.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from covidcxr import artifacts as A
from covidcxr.errors import ConfigError, DataError
from covidcxr.exporting.check import TOLERANCE, ExportCheckError, PixelReport, max_diff
from covidcxr.inference import Item, ModelFile, Predictor, onnx_outputs
from covidcxr.models.classifier import iter_layers

INSTALL = 'pip install "covidcxr[onnx]" (onnx, onnxruntime, tf2onnx)'


class OnnxConversionError(ConfigError):
    """The architecture does not convert to ONNX (the converter's reason is in the message)."""


def require_packages() -> None:
    """Refuse early (before any work) when the converter or ONNX Runtime is missing."""
    missing = [name for name in ("onnx", "onnxruntime", "tf2onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: {INSTALL}.")
    if keras.backend.backend() != "tensorflow":
        raise ConfigError("--format onnx converts under the TensorFlow backend; run with KERAS_BACKEND=tensorflow.")


def _frozen_normalizations(model) -> None:
    """Keras's Normalization layers given a fixed mean and variance (the keras.applications EfficientNets) hold
    them as eager tensors, which tf2onnx turns into extra graph inputs: make them NumPy, i.e. graph constants."""
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.Normalization) and not isinstance(getattr(layer, "mean", None),
                                                                            (keras.Variable, type(None))):
            layer.mean, layer.variance = np.asarray(layer.mean), np.asarray(layer.variance)


@contextlib.contextmanager
def _quiet_converter():
    """tf2onnx logs each optimiser it tries and the tracebacks of the ones it skips: keep errors only."""
    log = logging.getLogger("tf2onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def write_onnx_file(model, path: Path, arch: str) -> Path:
    """``model`` (uint8-range [B, S, S, 1] in) as ONNX at ``path``; OnnxConversionError with the reason."""
    size = model.inputs[0].shape[1:]
    model.predict_on_batch(np.zeros((1, *size), np.float32))   # Keras exports only a model that was called
    _frozen_normalizations(model)
    try:
        with _quiet_converter():
            model.export(str(path), format="onnx", verbose=False)
    except Exception as exc:  # the converter's failure on this architecture: its reason, one line
        path.unlink(missing_ok=True)
        raise OnnxConversionError(f"--format onnx: {arch} does not convert to ONNX ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else '?'}); "
                                  f"export it without onnx.") from exc
    extra = _extra_inputs(path)
    if extra:
        path.unlink(missing_ok=True)
        raise OnnxConversionError(f"--format onnx: {arch} converts to a graph with inputs beyond the image "
                                  f"({', '.join(extra[:3])}): tf2onnx did not freeze them; export it without onnx.")
    return path


def _extra_inputs(path: Path) -> list[str]:
    import onnx  # optional extra [onnx]: only for --format onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits][1:]


@dataclass
class OnnxCheck:
    files: int
    on_same_pixels: float = 0.0          # max |ONNX - Keras| on the Keras path's own input pixels
    end_to_end: float = 0.0              # max |ONNX predictor - Keras predictor| (files in, outputs out)
    crop_masks: PixelReport | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"ONNX Runtime checked on {self.files} images: max output difference {self.on_same_pixels:.1e} on "
                f"the same pixels, {self.end_to_end:.1e} end to end")


def check_onnx(folder: Path, paths: list[str], masks: list[str], tolerance: float = TOLERANCE) -> OnnxCheck | None:
    """ONNX Runtime against Keras in ``folder`` on ``paths`` (the same host-decoded pixels through both)."""
    if not paths:
        return None
    items = [Item(p, m) for p, m in zip(paths, masks)]
    ref = next(Predictor(folder, batch_size=len(items)).run(items))
    onnx_pred = Predictor(folder, batch_size=len(items), prefer=ModelFile.ONNX)
    got = next(onnx_pred.run(items))
    if ref.failed or got.failed:
        bad = (ref.failed or got.failed)[0]
        raise DataError(f"export check: {bad.item.path}: {bad.reason}; pass --check with readable image files.")
    same = onnx_pred.task.unpack(onnx_outputs(onnx_pred.session, ref.x))
    check = OnnxCheck(len(ref.done))
    check.on_same_pixels = max(max_diff(ref.probs, same.probs), max_diff(ref.masks, same.masks))
    check.end_to_end = max(max_diff(ref.probs, got.probs), max_diff(ref.masks, got.masks))
    if check.on_same_pixels > tolerance:
        check.problems.append(f"numerics: on identical input pixels ONNX Runtime's outputs differ from Keras's by "
                              f"{check.on_same_pixels:.2e} (> {tolerance})")
    if onnx_pred.segmenter is not None:
        check.crop_masks = PixelReport()
        for i, d in enumerate(ref.done):
            check.crop_masks.add(d.item.path, ref.x[i], got.x[i])
        if check.crop_masks.files_differing:
            check.problems.append("lung crop: the ONNX lung segmenter's cropped " + check.crop_masks.describe("pixels")
                                  + " from Keras's")
    return check


def write_onnx(model, segmenter, card: A.ModelCard, folder: Path, paths: list[str], masks: list[str]) -> str:
    """``folder/model.onnx`` (and ``lung_segmenter/model.onnx``), checked; the check's summary for the README."""
    write_onnx_file(model, folder / A.ONNX_MODEL, card.arch)
    if segmenter is not None:
        write_onnx_file(segmenter[0], folder / A.SEGMENTER_DIR / A.ONNX_MODEL, segmenter[1].arch + " (lung segmenter)")
    check = check_onnx(folder, paths, masks)
    if check is not None and check.problems:
        raise ExportCheckError("exported model.onnx does not reproduce the Keras model on the check images; export "
                               "discarded. " + "; ".join(check.problems) + ".")
    return check.summary() if check else "ONNX not checked: no check images"

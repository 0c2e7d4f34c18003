"""One predictor for ``.keras`` models, SavedModels and ONNX files, batched and pipelined; used by
``predict``, ``evaluate``, ``export`` (its check) and lung-cropped training.

Files are read and decoded by a pool of threads with exactly the preprocessing of training
(covidcxr/data/preprocess.py: 8/16-bit, DICOM, contrast, lung crop), a bounded window ahead
of the model, so decoding overlaps the model call and memory does not grow with the number of
files. The model runs once per batch: the backend's compiled ``predict_on_batch`` for a Keras
model (batches padded to one shape: one compilation), the ``serving_default`` signature with a
batch of image bytes for a SavedModel, an ONNX Runtime session on the host's uint8-range pixels for
``model.onnx`` (no TensorFlow or Keras compute; any batch size, so no padding). A file that cannot be
read is reported with its reason and the batch goes on without it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import keras
import numpy as np

import covidcxr.augment  # noqa: F401  (registers the augmentation layer for load_keras)
import covidcxr.losses  # noqa: F401  (registers the segmentation losses and MaskScore)
import covidcxr.models.layers  # noqa: F401  (registers BackboneInput)
import covidcxr.models.tokens  # noqa: F401  (registers the ViT token layers)
from covidcxr import hub
from covidcxr.artifacts import Located, LungCrop, ModelCard, locate
from covidcxr.augment import fixed_view
from covidcxr.data import preprocess as P
from covidcxr.data.imageio import decode_file, inspect_file, read_mask
from covidcxr.data.pool import decode_ahead, default_workers
from covidcxr.errors import ConfigError, DataError
from covidcxr.tasks import get_task

TF_DECODABLE = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})


@dataclass
class Item:
    """One input: the image file and, where the task needs them, its mask files."""

    path: str
    lung_mask: str = ""       # for classifiers trained on given lung crops, and the lungs-out probe
    key: object = None        # caller's row id
    data: bytes | None = None  # the file's bytes when already read (object storage, Ray): path then names it


@dataclass
class Decoded:
    item: Item
    image: np.ndarray | None = None          # uint8 [S, S] at the model's size (cropped as in training)
    height: int = 0
    width: int = 0
    reason: str = ""
    gray: np.ndarray | None = None           # full-resolution float image (keep_gray)
    seg_image: np.ndarray | None = None      # uint8 at the lung segmenter's size (crop 'model')
    lungs: np.ndarray | None = None          # uint8 {0,1} [S, S] lung mask (given crop, lungs-out probe)
    fingerprint: tuple | None = None         # (sha256 bytes, phash, phash_mirror, thumb 32x32)
    raw: bytes | None = None                 # bytes for a SavedModel


@dataclass
class Batch:
    """A finished batch: the decoded inputs that ran, their outputs, and the inputs that failed."""

    done: list[Decoded]
    x: np.ndarray | None                     # uint8 [n, S, S, 1] as fed to the model
    probs: np.ndarray | None = None          # [n, K]
    masks: np.ndarray | None = None          # [n, h, w] mask probabilities at model resolution
    failed: list[Decoded] = field(default_factory=list)
    image_pixels: np.ndarray | None = None   # SavedModel run with pixels=True: its input before a lung crop


class ModelFile(enum.StrEnum):
    """Which saved form of a model a Predictor runs."""
    KERAS = "keras"              # model.keras / best.keras: every feature (Grad-CAM, TTA, the lungs-out probe)
    SAVEDMODEL = "savedmodel"    # the TF SavedModel (serving/1): outputs only
    ONNX = "onnx"                # model.onnx (export --format onnx) in ONNX Runtime: outputs only

    @property
    def title(self) -> str:
        """How messages name this kind of file."""
        return {"keras": "Keras model", "savedmodel": "SavedModel", "onnx": "ONNX model"}[self.value]


def require_keras(kind: ModelFile, *flags: str) -> None:
    """The one rule for features that need the Keras model: refuse ``flags`` when ``kind`` is not Keras."""
    if flags and kind is not ModelFile.KERAS:
        raise ConfigError(f"{', '.join(flags)} need(s) the Keras model (model.keras): pass the run or export "
                          f"folder (not a bare {ModelFile(kind).title}) and --engine keras.")


class Predictor:
    """``Predictor(path).run(items)`` -> an iterator of ``Batch``.

    ``path``: run or export folder, ``.keras`` file, SavedModel folder or ``hf://OWNER/NAME[@REV]``. ``prefer``:
    'keras' (default, needed for Grad-CAM, TTA and the lungs-out probe), 'savedmodel' or 'onnx'."""

    def __init__(self, path: str | Path | Located, batch_size: int = 32, workers: int | None = None,
                 prefer: str | ModelFile = ModelFile.KERAS):
        self.located = path if isinstance(path, Located) else locate(path)
        self.card: ModelCard = self.located.card
        self.task = get_task(self.card.task)
        self.batch_size, self.workers = int(batch_size), workers or default_workers()
        self.kind = chosen_file(self.located, prefer)
        self.model = self.fn = self.segmenter = self.session = None
        if self.kind is ModelFile.ONNX:
            self.session = _onnx_session(self.located.onnx_path)
        if self.kind is ModelFile.SAVEDMODEL:
            self._loaded = _load_savedmodel(self.located.savedmodel_path)   # keeps the variables alive
            self.signatures = self._loaded.signatures
            self.fn = self.signatures["serving_default"]
        else:
            if self.kind is ModelFile.KERAS:
                self.model = load_keras(self.located.keras_path)
            if self.card.lung_crop is LungCrop.MODEL:
                seg = self.located.segmenter_dir
                if seg is None:
                    raise DataError(f"{self.located.root}: this classifier crops with a lung segmenter, but its "
                                    f"lung_segmenter/ folder is missing; copy it from the run folder.")
                self.segmenter = Predictor(seg, batch_size, self.workers, self.kind)

    def require_keras(self, *flags: str) -> None:
        require_keras(self.kind, *flags)

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def needs_lung_masks(self) -> bool:
        return self.card.lung_crop is LungCrop.GIVEN

    # ---------------------------------------------------------------- decoding (threads)

    def decode(self, item: Item, keep_gray=False, fingerprint=False, lungs=False) -> Decoded:
        if fingerprint:  # the overlap guard's hashes and thumbnail, from the same single decode
            info = inspect_file(item.path, keep_gray=True)
            gray, reason = info.gray, info.reason
        else:
            gray, reason = decode_file(item.path, item.data)
        if gray is None or reason:
            return Decoded(item, reason=reason)
        c = self.card
        d = Decoded(item, height=gray.shape[0], width=gray.shape[1])
        try:
            d.image = P.prepare(gray, c.image_size, c.contrast)
            if self.segmenter is not None:
                sc = self.segmenter.card
                d.seg_image = P.prepare(gray, sc.image_size, sc.contrast)
            if self.needs_lung_masks or lungs:
                if not item.lung_mask:
                    return Decoded(item, reason="no lung mask for this image")
                d.lungs = P.resize_mask(read_mask(item.lung_mask), c.image_size)
            if self.kind is ModelFile.SAVEDMODEL:
                native = Path(item.path).suffix.lower() in TF_DECODABLE
                raw = item.data if item.data is not None else (Path(item.path).read_bytes() if native else None)
                d.raw = raw if native else P.numpy_to_png_bytes(gray)
        except Exception as exc:  # a bad mask or an odd file: this input only
            return Decoded(item, reason=str(exc).splitlines()[0][:200])
        if fingerprint:
            d.fingerprint = (bytes.fromhex(info.sha256), info.phash, info.phash_mirror, info.thumb)
        if keep_gray:
            d.gray = gray
        return d

    def _decoded(self, items: Iterable[Item], **kw) -> Iterator[Decoded]:
        """Decoded inputs in order, at most ~3 batches ahead of the consumer."""
        return decode_ahead(lambda item: self.decode(item, **kw), items, 3 * self.batch_size, self.workers)

    # ---------------------------------------------------------------- the model (main thread)

    def run(self, items: Iterable[Item], *, keep_gray=False, fingerprint=False, view=None,
            lungs_out=False, pixels=False) -> Iterator[Batch]:
        """Batches of outputs. ``view``: (degrees, zoom) fixed transform (test-time augmentation);
        ``lungs_out``: black out each image's lung mask (the shortcut probe). Both need a Keras model.
        ``pixels``: for a SavedModel, also its own input pixels (``Batch.x``, ``Batch.image_pixels``)."""
        self.require_keras(*(["test-time augmentation"] if view is not None else [])
                           + (["the lungs-out probe"] if lungs_out else []))
        batch, failed = [], []
        for d in self._decoded(items, keep_gray=keep_gray, fingerprint=fingerprint, lungs=lungs_out):
            (failed if d.reason else batch).append(d)
            if len(batch) == self.batch_size:
                yield self._run_batch(batch, failed, view, lungs_out, pixels)
                batch, failed = [], []
        if batch or failed:
            yield self._run_batch(batch, failed, view, lungs_out, pixels)

    def _run_batch(self, done: list[Decoded], failed: list[Decoded], view, lungs_out, pixels=False) -> Batch:
        if not done:
            return Batch([], None, failed=failed)
        if self.kind is ModelFile.SAVEDMODEL:
            return self._run_savedmodel(done, failed, pixels)
        x = np.stack([d.image for d in done])[..., None]
        if self.card.lung_crop is LungCrop.GIVEN:
            x = x * np.stack([d.lungs for d in done])[..., None]
        elif self.segmenter is not None:
            x = x * self._predicted_lungs(done)[..., None]
        if lungs_out:
            x = x * (1 - np.stack([d.lungs for d in done]))[..., None]
        feed = x
        if view is not None and (view[0] or view[1] != 1.0):
            feed = np.round(keras.ops.convert_to_numpy(fixed_view(x, *view))).astype(np.uint8)
        out = self.task.unpack(self._call(feed))
        n = len(done)
        return Batch(done, x.astype(np.uint8), None if out.probs is None else out.probs[:n],
                     None if out.masks is None else out.masks[:n], failed)

    def _call(self, x: np.ndarray):
        """The Keras model on a batch padded to ``batch_size`` (one compiled shape), or the ONNX session."""
        if self.session is not None:
            return onnx_outputs(self.session, x)
        n = len(x)
        if n < self.batch_size:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, axis=0)])
        out = self.model.predict_on_batch(x)
        if isinstance(out, dict):
            return {k: v[:n] for k, v in out.items()}
        return out[:n]

    def _predicted_lungs(self, done: list[Decoded]) -> np.ndarray:
        """The segmenter's lung masks at this model's size: uint8 {0, 1} [n, S, S]."""
        seg = self.segmenter
        probs = seg.task.unpack(seg._call(np.stack([d.seg_image for d in done])[..., None])).masks
        return np.stack([P.mask_from_probs(p, self.card.image_size) for p in probs]).astype(np.uint8)

    def _savedmodel_feed(self, done: list[Decoded]) -> dict:
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        feed = {"image_bytes": tf.constant([d.raw for d in done])}
        if self.needs_lung_masks:
            feed["lung_mask_bytes"] = tf.constant([Path(d.item.lung_mask).read_bytes() for d in done])
        return feed

    def _run_savedmodel(self, done: list[Decoded], failed: list[Decoded], pixels=False) -> Batch:
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        try:
            feed = self._savedmodel_feed(done)
            res = self.fn(**feed)
            pix = self.signatures["pixels"](**feed) if pixels else {}
        except (tf.errors.OpError, UnicodeDecodeError, OSError) as exc:  # TF's message may quote the bad bytes
            if len(done) == 1:
                return Batch([], None, failed=failed + [Decoded(done[0].item, reason=_tf_reason(exc))])
            parts = [self._run_savedmodel([d], [], pixels) for d in done]   # one bad file fails only itself
            return _join(parts, failed)
        probs = res["probabilities"].numpy().astype(np.float64) if "probabilities" in res else None
        masks = res["mask"].numpy().astype(np.float32) if "mask" in res else None
        x = pix["pixels"].numpy() if pix else None
        return Batch(done, x, probs, masks, failed, pix["image_pixels"].numpy() if pix else None)

    def from_pixels(self, x: np.ndarray) -> dict:
        """A SavedModel's model alone on uint8-range pixels [n, S, S, 1] (its ``from_pixels`` endpoint)."""
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        if "from_pixels" not in self.signatures:
            raise DataError(f"{self.located.root}: this SavedModel has no from_pixels endpoint (exported before "
                            f"covidcxr 0.3); export it again with python -m covidcxr.export.")
        res = self.signatures["from_pixels"](pixels=tf.constant(np.asarray(x, np.float32)))
        out = {k: v.numpy() for k, v in res.items() if k in ("probabilities", "mask")}
        return out


def chosen_file(loc: Located, prefer: str | ModelFile = ModelFile.KERAS) -> ModelFile:
    """Which saved form a Predictor of ``loc`` runs: the preferred one (ONNX: refused when there is no
    model.onnx), else the Keras model, else what the folder has."""
    prefer = ModelFile(prefer)
    if prefer is ModelFile.ONNX:
        if loc.onnx_path is None:
            raise ConfigError(f"--engine onnx: {loc.root} has no model.onnx; export it with python -m covidcxr.export "
                              f"{loc.root} --out DIR --format savedmodel,onnx.")
        return ModelFile.ONNX
    if loc.keras_path is None or (prefer is ModelFile.SAVEDMODEL and loc.savedmodel_path):
        if loc.savedmodel_path is None:
            return ModelFile.ONNX
        return ModelFile.SAVEDMODEL
    return ModelFile.KERAS


def _onnx_session(path: Path):
    try:
        import onnxruntime as ort  # optional extra [onnx]: only where a model.onnx runs
    except ImportError as exc:
        raise ConfigError("--engine onnx needs ONNX Runtime: pip install \"covidcxr[onnx]\".") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=ort.get_available_providers())
    except Exception as exc:  # ONNX Runtime's own errors (a corrupt or foreign file): one line
        raise DataError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]}).") from exc


def onnx_outputs(session, x: np.ndarray):
    """An exported model.onnx on uint8-range pixels: the model's outputs as the Keras model gives them
    (one array, or the multi-task dict of ``label`` and ``mask``)."""
    names = [o.name for o in session.get_outputs()]
    outs = session.run(None, {session.get_inputs()[0].name: np.asarray(x, np.float32)})
    if len(outs) == 1:
        return outs[0]
    return dict(zip(names, outs))


def _tf_reason(exc: Exception) -> str:
    text = getattr(exc, "message", "") or str(exc) or type(exc).__name__
    return "the SavedModel cannot decode this file (" + text.strip().splitlines()[0][:160] + ")"


def _join(parts: list[Batch], failed: list[Decoded]) -> Batch:
    """One batch from single-item batches (some failed)."""
    ok = [b for b in parts if b.done]
    failed = failed + [f for b in parts for f in b.failed]
    if not ok:
        return Batch([], None, failed=failed)

    def cat(name):
        vals = [getattr(b, name) for b in ok]
        return None if vals[0] is None else np.concatenate(vals)

    return Batch([d for b in ok for d in b.done], cat("x"), cat("probs"), cat("masks"), failed, cat("image_pixels"))


def load_model(path: str | Path):
    """``covidcxr.load_model``: the Keras model of a run folder, an export folder (``hf://OWNER/NAME`` too) or a
    ``.keras`` file."""
    p = Path(path)
    if hub.is_handle(path) or p.is_dir():
        found = locate(path)
        if found.keras_path is None:
            raise DataError(f"{p}: a bare SavedModel has no Keras model; load it with tf.saved_model.load, or pass "
                            f"the export folder that holds model.keras.")
        p = found.keras_path
    return load_keras(p)


def load_keras(path: str | Path):
    """A saved covidcxr model, not compiled. The modules imported at the top of this one define (and so
    register with Keras) every custom object a covidcxr model holds: ``BackboneInput``
    (models.layers), the token layers (models.tokens), the augmentation layer (augment) and the
    segmentation losses and ``MaskScore`` (losses)."""
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot load this Keras model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from exc


def _load_savedmodel(path: Path):
    try:
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs
    except ImportError as exc:
        raise DataError(f"{path} is a TensorFlow SavedModel and TensorFlow is not installed; pass the run or "
                        f"export folder (model.keras) instead, or pip install tensorflow.") from exc
    return tf.saved_model.load(str(path))

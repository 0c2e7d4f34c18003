"""One small object per task: which architecture names it takes, how its model is built,
its losses and metrics, what its batches carry, and how its outputs are read.

Everything that used to be ``if task == "..."`` lives here, behind ``get_task(name)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from covidcxr.errors import ConfigError
from covidcxr.losses import MaskScore, get_loss
from covidcxr.models.classifier import build_classifier
from covidcxr.models.registry import check_image_size, get_spec
from covidcxr.models.segmentation import build_segmenter, seg_spec


def parse_loss_weights(text: str) -> dict[str, float]:
    try:
        parts = dict(kv.split("=") for kv in text.split(",")) if "=" in text else \
            dict(zip(("label", "mask"), text.split(",")))
        w = {k.strip(): float(v) for k, v in parts.items()}
    except ValueError:
        w = {}
    if set(w) != {"label", "mask"} or min(w.values()) < 0:
        raise ConfigError(f"--loss-weights {text!r}: write label=W1,mask=W2 (non-negative numbers).")
    return w


@dataclass(frozen=True)
class Outputs:
    """A model's outputs as NumPy: class probabilities [n, K] and/or mask probabilities [n, h, w]."""

    probs: np.ndarray | None = None
    masks: np.ndarray | None = None


class Task:
    name = ""
    classifies = False          # has class probabilities (a ``label`` output)
    segments = False            # has a ``mask`` output
    default_monitor = "val_macro_f1"

    @property
    def only_classifies(self) -> bool:
        """Class probabilities and nothing else: Grad-CAM, lung crops and the lungs-out check apply."""
        return self.classifies and not self.segments

    @property
    def only_segments(self) -> bool:
        """A mask and nothing else: no class probabilities, labels or calibration."""
        return self.segments and not self.classifies

    @property
    def multi_output(self) -> bool:
        """Two named outputs, ``label`` and ``mask`` (a multi-task model)."""
        return self.classifies and self.segments

    def output_columns(self, classes: list[str], mask_columns: list[str]) -> list[str]:
        """The columns of a prediction table for this task's model."""
        return (["path"] + (["label"] + [f"prob_{c}" for c in classes] if self.classifies else [])
                + (list(mask_columns) if self.segments else []))

    def check_config(self, cfg) -> None:
        """Task-specific checks of a TrainConfig (``TrainConfig.validate``)."""

    def loss_weight(self, cfg, head: str) -> float:
        """The weight of one head's loss (``label`` or ``mask``) in the total."""
        return 1.0

    # ---- architecture
    def spec(self, arch: str, image_size: int):
        raise NotImplementedError

    def build(self, arch: str, image_size: int, n_classes: int, weights, dropout: float, bn_momentum):
        raise NotImplementedError

    # ---- data
    @property
    def needs_mask(self) -> bool:
        """Batches carry the target mask (augmented with the image)."""
        return self.segments

    def mask_column(self, target: str) -> str:
        return f"{target}_mask"

    # ---- losses and metrics (Keras compile arguments)
    def compile_args(self, cfg) -> dict:
        raise NotImplementedError

    def loss_inputs(self, x, y, out, aug_mask):
        """(y_true, y_pred, sample_weight) in the structure ``compile_args`` expects."""
        raise NotImplementedError

    # ---- outputs
    def unpack(self, out) -> Outputs:
        """Model outputs (backend tensors or NumPy) -> Outputs in NumPy."""
        def np_(t):
            return keras.ops.convert_to_numpy(t)

        if isinstance(out, dict):
            return Outputs(np_(out["label"]).astype(np.float64), np_(out["mask"])[..., 0].astype(np.float32))
        if self.segments:
            return Outputs(masks=np_(out)[..., 0].astype(np.float32))
        return Outputs(probs=np_(out).astype(np.float64))


def _cce(cfg):
    return keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)


def _mask_metrics():
    return [MaskScore("dice"), MaskScore("iou")]


class Classify(Task):
    name = "classify"
    classifies = True

    def spec(self, arch, image_size):
        spec = get_spec(arch)
        check_image_size(spec, image_size)
        return spec

    def build(self, arch, image_size, n_classes, weights, dropout, bn_momentum):
        return build_classifier(self.spec(arch, image_size), n_classes, image_size, weights, dropout=dropout,
                                bn_momentum=bn_momentum)

    def compile_args(self, cfg):
        return {"loss": _cce(cfg), "metrics": ["accuracy"]}

    def loss_inputs(self, x, y, out, aug_mask):
        return y, out, x["class_weight"]


class Segment(Task):
    name = "segment"
    segments = True
    default_monitor = "val_dice"

    def spec(self, arch, image_size):
        spec = seg_spec(arch)
        if image_size % spec.size_multiple or image_size < spec.size_multiple:
            raise ConfigError(f"--image-size {image_size} does not suit {arch}: use a multiple of "
                              f"{spec.size_multiple}.")
        return spec

    def build(self, arch, image_size, n_classes, weights, dropout, bn_momentum):
        return build_segmenter(arch, image_size, weights, num_classes=self._heads(n_classes), dropout=dropout,
                               bn_momentum=bn_momentum)

    def _heads(self, n_classes):
        return None

    def compile_args(self, cfg):
        # weighted_metrics: Keras passes sample weights (0 = no mask) to these, not to `metrics`.
        return {"loss": get_loss(cfg.seg_loss), "weighted_metrics": _mask_metrics()}

    def loss_inputs(self, x, y, out, aug_mask):
        return ops.cast(aug_mask, "float32"), out, x["mask_weight"]


class Multitask(Segment):
    name = "multitask"
    classifies = True
    default_monitor = "val_macro_f1"

    def _heads(self, n_classes):
        return n_classes

    def check_config(self, cfg) -> None:
        parse_loss_weights(cfg.loss_weights)

    def loss_weight(self, cfg, head: str) -> float:
        return parse_loss_weights(cfg.loss_weights)[head]

    def compile_args(self, cfg):
        return {"loss": {"label": _cce(cfg), "mask": get_loss(cfg.seg_loss)},
                "loss_weights": parse_loss_weights(cfg.loss_weights), "metrics": {"label": ["accuracy"]},
                "weighted_metrics": {"mask": _mask_metrics()}}

    def loss_inputs(self, x, y, out, aug_mask):
        return ({"label": y, "mask": ops.cast(aug_mask, "float32")}, out,
                {"label": x["class_weight"], "mask": x["mask_weight"]})


TASKS = {t.name: t for t in (Classify(), Segment(), Multitask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]

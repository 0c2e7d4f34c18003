"""Typed run configuration, written as ``config.json`` into every run directory.

Plain dataclasses: importing this module imports no TensorFlow, JAX or Keras, so every
value is checked (``TrainConfig.validate``) before anything heavy starts or any folder is made.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from covidcxr.artifacts import LungCrop, atomic_write_text
from covidcxr.data.preprocess import CONTRAST_METHODS
from covidcxr.data.splits import parse_fractions
from covidcxr.errors import ConfigError
from covidcxr.tasks import TASKS, get_task


@dataclass
class AugmentConfig:
    """Geometric and photometric augmentation; image and mask move together.

    Horizontal flips are off by default: they turn the heart to the right
    (dextrocardia), which never occurs in the data a model will see.
    """

    rotation_deg: float = 7.0
    zoom: float = 0.10
    shift: float = 0.05
    hflip: bool = False
    brightness: float = 0.10
    contrast: float = 0.15

    @property
    def is_identity(self) -> bool:
        return not (self.rotation_deg or self.zoom or self.shift or self.hflip or self.brightness or self.contrast)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(0.0, 0.0, 0.0, False, 0.0, 0.0)

    def validate(self) -> None:
        if not 0 <= self.rotation_deg <= 45 or not 0 <= self.zoom < 0.5 or not 0 <= self.shift < 0.5 \
                or not 0 <= self.brightness < 1 or not 0 <= self.contrast < 1:
            raise ConfigError(f"augmentation out of range: {self}")


@dataclass
class TrainConfig:
    task: str = "classify"
    arch: str = "resnet50"
    data: str | None = None            # dataset folder or manifest CSV; None = synthetic demo
    weights: str | None = "auto"       # auto | imagenet | none | PATH (resolved value stored)
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 10                   # phase 1 (head) or, from scratch, the first part of the budget
    fine_tune_epochs: int = 10         # phase 2
    unfreeze: str = "all"              # top N backbone layers, or 'all'
    lr: float = 5e-4                   # phase 1; phase 2 uses lr / 10
    weight_decay: float = 1e-6
    label_smoothing: float = 0.1
    dropout: float = 0.3
    bn_momentum: float = 0.9           # from-scratch BN momentum (Keras default 0.99)
    warmup_epochs: float = 1.0
    class_weights: bool = True
    contrast: str = "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    split: str = "0.7,0.15,0.15"
    seed: int = 42
    monitor: str = "val_macro_f1"
    patience: int = 8
    mixed_precision: bool | None = None   # None: on for a GPU/TPU, off on a CPU
    jit_compile: bool | None = None       # None: on for a GPU/TPU (TensorFlow, JAX), off on a CPU
    cache_dir: str = ""                   # '' = the user cache folder (covidcxr.data.cache)
    workers: int | None = None            # cache-building processes (None: CPU count)
    freeze_encoder: bool = False       # linear probe: the head only, throughout
    label_fraction: float = 1.0        # stratified fraction of the training split used
    lung_crop: str = ""                # '' | given | path of a lung segmenter (see covidcxr.lungcrop)
    target: str = "lung"               # segment/multitask: lung | infection masks
    seg_loss: str = "bce_dice"         # segment/multitask: bce_dice | dice | focal
    loss_weights: str = "label=1,mask=1"  # multitask
    run_dir: str = ""
    export_dir: str = ""
    keep_resume_state: bool = False    # keep resume.npz after the run finishes (removed by default)
    demo: bool = False
    command: str = ""

    def validate(self) -> "TrainConfig":
        """Every number and choice checked once, with the flag named; returns self."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.task in TASKS, f"--task {self.task}: classify, segment or multitask.")
        need(self.image_size >= 16, f"--image-size {self.image_size}: use 16 or more (e.g. 224).")
        need(self.batch_size >= 1, f"--batch-size {self.batch_size}: use 1 or more.")
        need(self.epochs >= 0 and self.fine_tune_epochs >= 0,
             f"--epochs {self.epochs} / --fine-tune-epochs {self.fine_tune_epochs}: use 0 or more.")
        need(self.epochs + self.fine_tune_epochs >= 1, "--epochs and --fine-tune-epochs are both 0: nothing to train.")
        need(self.lr > 0, f"--lr {self.lr}: the learning rate must be positive.")
        need(self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: use 0 or more.")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing}: use [0, 1).")
        need(0 <= self.dropout < 1, f"--dropout {self.dropout}: use [0, 1).")
        need(0 < self.bn_momentum < 1, f"--bn-momentum {self.bn_momentum}: use (0, 1).")
        need(self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs}: use 0 or more.")
        need(self.patience >= 1, f"--patience {self.patience}: use 1 or more.")
        need(0 < self.label_fraction <= 1, f"--label-fraction {self.label_fraction}: use a fraction in (0, 1].")
        need(self.unfreeze == "all" or (self.unfreeze.isdigit() and int(self.unfreeze) >= 0),
             f"--unfreeze {self.unfreeze}: a number of layers, or 'all'.")
        need(self.contrast in CONTRAST_METHODS, f"--contrast {self.contrast}: one of {', '.join(CONTRAST_METHODS)}.")
        need(self.workers is None or self.workers >= 0, f"--workers {self.workers}: use 0 or more.")
        need(self.target in ("lung", "infection"), f"--target {self.target}: lung or infection.")
        parse_fractions(self.split)
        self.augment.validate()
        get_task(self.task).check_config(self)
        return self

    @property
    def crop(self) -> LungCrop:
        """What ``lung_crop`` ('' | given | PATH of a lung segmenter) means."""
        return LungCrop.of_config(self.lung_crop)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        d = json.loads(Path(path).read_text())
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

"""Typed run configuration, written as ``config.json`` into every run directory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from covidcxr.data.pipeline import AugmentConfig


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
    mixed_precision: bool = False
    jit_compile: bool = False
    cache: str = "memory"
    freeze_encoder: bool = False       # linear probe: the head only, throughout
    label_fraction: float = 1.0        # stratified fraction of the training split used
    lung_crop: str = ""                # '' | given | path of a lung segmenter (see covidcxr.lungcrop)
    target: str = "lung"               # segment/multitask: lung | infection masks
    seg_loss: str = "bce_dice"         # segment/multitask: bce_dice | dice | focal
    loss_weights: str = "label=1,mask=1"  # multitask
    run_dir: str = ""
    export_dir: str = ""
    demo: bool = False
    command: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        d = json.loads(Path(path).read_text())
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        if isinstance(d.get("lung_crop"), bool):  # runs written before lung_crop took a source
            d["lung_crop"] = "given" if d["lung_crop"] else ""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

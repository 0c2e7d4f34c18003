"""The training schedule as a list of phases, and the per-phase controls.

- pretrained weights: ``head`` (frozen backbone, ``--lr``, warm-up) then ``finetune`` (top
  ``--unfreeze`` backbone layers at ``lr / 10``, BatchNormalization frozen, starting from the
  best head checkpoint); ``--freeze-encoder`` stops after the head (linear probe);
- from scratch: one ``scratch`` phase of ``--epochs + --fine-tune-epochs`` (the whole network,
  or the head alone over a frozen random encoder with ``--freeze-encoder``).

Each phase gets a fresh optimizer (``WarmupAdamW``: the warm-up is part of the optimizer,
computed from its own step counter, so it works inside any backend's compiled step), its own
early stopping and learning-rate-on-plateau state. All of that state is plain numbers that a
resumed run restores, so resuming means skipping the finished phases and continuing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np
from keras import ops

from covidcxr.models.classifier import freeze_backbone, get_backbone, iter_layers, unfreeze_top
from covidcxr.models.tokens import freeze_position_embeddings, has_interpolated_positions


@dataclass(frozen=True)
class Trainable:
    """What a phase trains: the head alone (``head``), the whole network (``all``) or the head and
    the top ``top`` backbone layers (``top:N`` in the phase's description)."""
    head_only: bool = False
    top: int | None = None            # None with head_only False: every layer

    @classmethod
    def parse(cls, unfreeze: str | int) -> "Trainable":
        """From ``--unfreeze``: 'all' or a layer count."""
        return ALL if str(unfreeze) == "all" else cls(top=int(unfreeze))

    def __str__(self) -> str:
        return "head" if self.head_only else "all" if self.top is None else f"top:{self.top}"


HEAD, ALL = Trainable(head_only=True), Trainable()


@dataclass
class Phase:
    name: str            # head | finetune | scratch
    epochs: int
    lr: float
    warmup_epochs: float = 0.0
    trainable: Trainable = ALL
    from_best: bool = False  # start from the best checkpoint so far (fine-tuning after the head)


def plan(cfg, pretrained: bool) -> list[Phase]:
    if not pretrained:
        total = cfg.epochs + cfg.fine_tune_epochs
        return [Phase("scratch", total, cfg.lr, cfg.warmup_epochs, HEAD if cfg.freeze_encoder else ALL)]
    phases = [Phase("head", cfg.epochs, cfg.lr, cfg.warmup_epochs, HEAD)]
    if not cfg.freeze_encoder and cfg.fine_tune_epochs > 0:
        phases.append(Phase("finetune", cfg.fine_tune_epochs, cfg.lr / 10, 0.0, Trainable.parse(cfg.unfreeze),
                            from_best=True))
    return [p for p in phases if p.epochs > 0]


PHASE_CODES = {"scratch": 0, "head": 1, "finetune": 2}


def apply_trainable(net: keras.Model, phase: Phase) -> str:
    """Freeze/unfreeze the backbone for ``phase``; returns a short description."""
    names = {layer.name for layer in net.layers}
    if "backbone" not in names:  # a plain U-Net: everything trains
        return "all layers"
    if phase.trainable.head_only:
        freeze_backbone(net)
        return "head only (backbone frozen)"
    if phase.trainable == ALL and phase.name == "scratch":
        get_backbone(net).trainable = True
        what = "all layers"
    else:
        n = unfreeze_top(net, "all" if phase.trainable.top is None else phase.trainable.top)
        what = f"{n} backbone layers unfrozen (BatchNormalization frozen)"
    return what + _freeze_position_embeddings(get_backbone(net))


def _freeze_position_embeddings(backbone) -> str:
    """DINOv2 position embeddings stay frozen: keras-hub 0.32 does not save their fine-tuned
    values faithfully (see covidcxr.models.tokens.freeze_position_embeddings). Found by what they are
    (interpolated position embeddings, which only keras-hub's DINOv2 has), not by class name."""
    found = [layer for layer in iter_layers(backbone) if has_interpolated_positions(layer)]
    for layer in found:
        freeze_position_embeddings(layer)
    return ", DINOv2 position embeddings frozen" if found else ""


@keras.saving.register_keras_serializable(package="covidcxr")
class WarmupAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate ramps linearly over its first ``warmup_steps`` steps.
    ``learning_rate`` stays a variable (the base rate) so plateau reductions can assign it."""

    def __init__(self, learning_rate=1e-3, warmup_steps: int = 0, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.warmup_steps = int(warmup_steps)

    def _get_current_learning_rate(self):
        base = super()._get_current_learning_rate()
        if self.warmup_steps <= 0:
            return base
        return base * ops.minimum(1.0, ops.cast(self.iterations + 1, "float32") / float(self.warmup_steps))

    @property
    def base_learning_rate(self) -> float:
        return float(ops.convert_to_numpy(self._learning_rate))

    def get_config(self):
        return {**super().get_config(), "warmup_steps": self.warmup_steps}


def make_optimizer(phase: Phase, steps_per_epoch: int, weight_decay: float) -> WarmupAdamW:
    return WarmupAdamW(phase.lr, warmup_steps=int(round(phase.warmup_epochs * steps_per_epoch)),
                       weight_decay=weight_decay)


@dataclass
class Controls:
    """Early stopping (on the monitored metric, higher is better) and learning-rate reduction on a
    validation-loss plateau, as Keras' EarlyStopping(patience) and ReduceLROnPlateau(factor 0.5,
    patience 3, min_delta 1e-4, min_lr 1e-7) do, kept as plain state for resuming."""

    patience: int
    stop_best: float = -np.inf
    stop_wait: int = 0
    loss_best: float = np.inf
    loss_wait: int = 0
    factor: float = 0.5
    lr_patience: int = 3
    min_delta: float = 1e-4
    min_lr: float = 1e-7

    def update(self, monitor_value: float, val_loss: float, lr: float) -> tuple[bool, float]:
        """After an epoch: (stop now?, learning rate for the next epoch)."""
        if monitor_value > self.stop_best:
            self.stop_best, self.stop_wait = monitor_value, 0
        else:
            self.stop_wait += 1
        new_lr = lr
        if val_loss < self.loss_best - self.min_delta:
            self.loss_best, self.loss_wait = val_loss, 0
        else:
            self.loss_wait += 1
            if self.loss_wait >= self.lr_patience:
                if lr > np.float32(self.min_lr):
                    new_lr = max(lr * self.factor, self.min_lr)
                self.loss_wait = 0
        return self.stop_wait >= self.patience, new_lr

    def state(self) -> dict:
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self).items()}

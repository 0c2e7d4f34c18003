"""Training callbacks: validation macro-F1/AUC, LR warm-up, resumable state, throughput."""
from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np

from covidcxr.metrics import classification_metrics


def predict_dataset(model, ds):
    """(true class indices, probabilities) over a (x, y, w) dataset."""
    ys, ps = [], []
    for x, y, _ in ds:
        out = model(x, training=False)
        if isinstance(out, dict):
            out, y = out["label"], y["label"]
        ps.append(keras.ops.convert_to_numpy(out))
        ys.append(np.argmax(keras.ops.convert_to_numpy(y), axis=-1))
    if not ps:
        return np.zeros(0, int), np.zeros((0, 0))
    return np.concatenate(ys), np.concatenate(ps)


class ValidationMetrics(keras.callbacks.Callback):
    """Adds ``val_macro_f1`` and ``val_macro_auc`` to the epoch logs (for checkpointing)."""

    def __init__(self, val_ds, class_names):
        super().__init__()
        self.val_ds, self.class_names = val_ds, class_names

    def on_epoch_end(self, epoch, logs=None):
        y, p = predict_dataset(self.model, self.val_ds)
        m = classification_metrics(y, p, self.class_names)
        logs["val_macro_f1"] = m["macro_f1"]
        logs["val_macro_auc"] = m["macro_auc"] if m["macro_auc"] is not None else 0.0
        print(f" - val_macro_f1: {m['macro_f1']:.4f} - val_macro_auc: {logs['val_macro_auc']:.4f}", flush=True)


class Warmup(keras.callbacks.Callback):
    """Linear learning-rate warm-up over the first ``steps`` training steps."""

    def __init__(self, target_lr: float, steps: int):
        super().__init__()
        self.target, self.steps, self.seen = target_lr, max(1, int(steps)), 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen < self.steps:
            self.seen += 1
            self.model.optimizer.learning_rate.assign(self.target * self.seen / self.steps)


class PhaseLog(keras.callbacks.Callback):
    """Adds phase and learning rate to the logs and measures training throughput
    (images/s, training steps only; overall, and after the first epoch, which pays for tracing)."""

    def __init__(self, phase: str, n_train: int):
        super().__init__()
        self.phase, self.n_train = phase, n_train
        self.epoch_times: list[float] = []
        self._t = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()
        self._last = self._t

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_times.append(self._last - self._t)
        logs["phase"] = {"head": 1, "finetune": 2, "scratch": 0}[self.phase]
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    @property
    def images_per_second(self) -> float:
        t = sum(self.epoch_times)
        return len(self.epoch_times) * self.n_train / t if t else 0.0

    @property
    def steady_images_per_second(self) -> float | None:
        """Images/s over the epochs after the first (None with fewer than two epochs)."""
        t = sum(self.epoch_times[1:])
        return (len(self.epoch_times) - 1) * self.n_train / t if t else None


class ResumeState(keras.callbacks.Callback):
    """Saves last.keras and state.json; must run after every other callback so a
    kill never leaves a state that claims an epoch the history lacks."""

    def __init__(self, phase: str, run_dir: Path, checkpoint):
        super().__init__()
        self.phase, self.run_dir, self.checkpoint = phase, Path(run_dir), checkpoint

    def on_epoch_end(self, epoch, logs=None):
        self.model.save(self.run_dir / "last.keras")
        best = getattr(self.checkpoint, "best", None)
        state = {"phase": self.phase, "epoch": epoch + 1,
                 "best": None if best is None or not np.isfinite(best) else float(best)}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.run_dir / "state.json")

"""The training loop: phases of epochs, a validation pass after each, checkpoints, resuming.

Each epoch is one ``fit`` call on the ``Trainee`` over that epoch's batches (with a progress
line inside it: covidcxr/training/progress.py), then one pass of the plain network over the
validation batches (loss, accuracy, macro-F1/AUC, Dice/IoU), then, in this order: the best
checkpoint (``best.keras``, the float32 network), one history row, the resume state (every
variable of the model, its augmentation and dropout seeds and the optimizer, with the
early-stopping and plateau counters), and last ``state.json``, the commit point. A run killed at
any moment resumes from its last committed epoch and ends with the same ``history.csv`` as an
uninterrupted run (a run that finishes removes its resume state unless ``keep_resume_state``).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from covidcxr import artifacts as A
from covidcxr.losses import get_loss
from covidcxr.metrics import classification_metrics
from covidcxr.segmetrics import mask_scores
from covidcxr.tasks import Outputs, get_task
from covidcxr.training.phases import Controls, PHASE_CODES, Phase, apply_trainable, make_optimizer
from covidcxr.training.progress import StepProgress


@dataclass
class LoopState:
    phase_index: int = 0
    epoch_in_phase: int = 0
    epochs_done: int = 0
    phase_finished: bool = False
    controls: dict = field(default_factory=dict)
    best: float | None = None
    best_epoch: int | None = None
    stopped: bool = False          # the current phase ended by early stopping
    finished: bool = False

    @classmethod
    def load(cls, run_dir: Path) -> "LoopState":
        d = json.loads((run_dir / A.STATE).read_text())
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, run_dir: Path) -> None:
        A.atomic_write_text(run_dir / A.STATE, json.dumps(self.__dict__, indent=2))


# ---------------------------------------------------------------- validation


def predict_batches(net, batches, task):
    """Outputs of the plain network over every row of ``batches`` (padding removed)."""
    probs, masks = [], []
    batches.set_epoch(0)
    for i in range(len(batches)):
        x, _ = batches[i]
        out = task.unpack(net.predict_on_batch(x["image"]))
        k = batches.valid(i)
        if out.probs is not None:
            probs.append(out.probs[:k])
        if out.masks is not None:
            masks.append(out.masks[:k])
    return Outputs(np.concatenate(probs) if probs else None, np.concatenate(masks) if masks else None)


def validate(net, batches, task, cfg) -> dict:
    """val_* figures of the network on ``batches`` (the loss as training computes it, unweighted)."""
    out = predict_batches(net, batches, task)
    data, rows = batches.data, batches.rows
    logs, loss = {}, 0.0
    if out.probs is not None:
        y = data.labels()[rows]
        onehot = np.eye(len(data.classes), dtype=np.float32)[y]
        ce = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
        loss += _weight(cfg, "label") * float(keras.ops.convert_to_numpy(ce(onehot, out.probs.astype(np.float32))))
        m = classification_metrics(y, out.probs, data.classes)
        logs.update(val_accuracy=m["accuracy"], val_macro_f1=m["macro_f1"], val_macro_auc=m["macro_auc"] or 0.0)
    if out.masks is not None:
        col = data.mask_column
        has = data.cache.has_mask[col][rows]
        truth = np.asarray(data.cache.masks[col][rows[has]], np.float32)[..., None]
        if has.any():
            per_image = keras.ops.convert_to_numpy(get_loss(cfg.seg_loss)(truth, out.masks[has][..., None]))
            loss += _weight(cfg, "mask") * float(np.mean(per_image))
            dice, iou = mask_scores(truth, out.masks[has])
            logs.update(val_dice=float(dice.mean()), val_iou=float(iou.mean()))
        else:
            logs.update(val_dice=0.0, val_iou=0.0)
    logs["val_loss"] = loss
    return logs


def _weight(cfg, head: str) -> float:
    return get_task(cfg.task).loss_weight(cfg, head)


# ---------------------------------------------------------------- files


class History:
    """history.csv: one row per committed epoch, columns fixed by the first row."""

    def __init__(self, path: Path, keep_rows: int):
        self.path = path
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        self.rows = rows[:keep_rows]
        self.columns = list(rows[0].keys()) if rows else None
        self._write()

    def _write(self):
        if self.columns is None:
            return
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)

    def append(self, row: dict) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        if self.columns is None:
            self.columns = list(row)
            self.rows = []
        self.rows.append({c: row.get(c, "") for c in self.columns})
        self._write()


def _fmt(v):
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


class Scalars:
    """TensorBoard scalars (event files written directly: no TensorFlow needed on JAX/PyTorch)."""

    def __init__(self, folder: Path):
        from tensorboard.compat.proto import event_pb2  # loaded only when a run writes its TensorBoard scalars
        from tensorboard.summary.writer.record_writer import RecordWriter  # loaded only when a run writes its TensorBoard scalars

        folder.mkdir(parents=True, exist_ok=True)
        self._pb = event_pb2
        self._w = RecordWriter(open(folder / f"events.out.tfevents.{int(time.time())}.covidcxr", "ab"))
        self._w.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def write(self, step: int, values: dict) -> None:
        from tensorboard.compat.proto import summary_pb2  # loaded only when a run writes its TensorBoard scalars

        vals = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
                if isinstance(v, (int, float, np.floating)) and np.isfinite(v)]
        ev = self._pb.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=vals))
        self._w.write(ev.SerializeToString())
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def float32_twin(net: keras.Model) -> keras.Model:
    """The same network with every layer in float32 (what checkpoints hold, so that inference and
    export on a CPU never run in bfloat16). Rebuilt from the config; weights copied by the caller."""
    def fix(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "DTypePolicy" or obj.get("class_name") == "DTypePolicyMap":
                return "float32"
            return {k: fix(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fix(v) for v in obj]
        return "float32" if obj in ("mixed_bfloat16", "mixed_float16") else obj

    return net.__class__.from_config(fix(net.get_config()))


def save_resume(trainee, run_dir: Path) -> None:
    """Every variable of the trainee (weights, BN statistics, seed states) and of its optimizer."""
    arrays = {f"m{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(trainee.variables)}
    arrays.update({f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(trainee.optimizer.variables)})
    tmp = run_dir / f".{A.RESUME}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(run_dir / A.RESUME)


def build_state(model, batches) -> None:
    """Create every variable of a compiled ``model`` (metrics, loss trackers, optimizer) now, symbolically,
    from the shapes of one batch of ``batches``, as Keras does itself under a distribution strategy.
    Otherwise Keras' TensorFlow trainer creates them inside the first trace of the train step, and
    tf.function then traces that step a second time: about 10 s of a tiny model's start-up on this CPU,
    more for a large one. Nothing is computed and no seed moves."""
    x, y = batches.batch(0)
    model._symbolic_build(data_batch=(x, y, None))  # Keras 3's own builder (a private method since 3.0)


def load_resume(trainee, run_dir: Path, optimizer: bool = True) -> None:
    """Restore the trainee's variables (and, mid-phase, its optimizer's) from the last epoch."""
    data = np.load(run_dir / A.RESUME)
    pairs = [("m", trainee.variables)]
    if optimizer:
        if not trainee.optimizer.built:  # built with the rest of the state after compile (build_state)
            trainee.optimizer.build(trainee.trainable_variables)
        pairs.append(("o", trainee.optimizer.variables))
    for prefix, variables in pairs:
        n = sum(1 for k in data.files if k.startswith(prefix))
        if n != len(variables):
            raise RuntimeError(f"resume state holds {n} {prefix} variables, the rebuilt model {len(variables)}")
        for i, v in enumerate(variables):
            v.assign(data[f"{prefix}{i}"])


# ---------------------------------------------------------------- the loop


def fit_epoch(model, batches, epoch: int, desc: str) -> tuple[dict, float]:
    """One epoch of ``model.fit`` over ``batches`` in the order ``batches.set_epoch(epoch)`` fixes (the same
    seed gives the same batches on every backend), with a step progress line: (last logs, seconds).
    Supervised phases (``Loop``) and SimCLR pretraining both train through it."""
    batches.set_epoch(epoch)
    progress = StepProgress(len(batches), batches.bs, desc)
    t0 = time.perf_counter()
    fit = model.fit(batches, epochs=1, verbose=0, shuffle=False, callbacks=[progress])
    return {k: float(v[-1]) for k, v in fit.history.items()}, time.perf_counter() - t0


@dataclass
class Loop:
    """Runs ``phases`` for ``trainee`` over ``train``/``val`` batches, writing into ``run_dir``."""

    trainee: object
    task: object
    cfg: object
    phases: list[Phase]
    train: object
    val: object
    run_dir: Path
    jit_compile: bool = False
    log: callable = print
    save_model: object = None   # what best.keras holds (default the trainee's network)
    after_epoch: object = None  # called as after_epoch(epoch, network) after each epoch (multi-host: weight digests)
    summaries: list[str] = field(default_factory=list)

    def _compile(self, phase: Phase) -> str:
        what = apply_trainable(self.trainee.net, phase)
        opt = make_optimizer(phase, len(self.train), self.cfg.weight_decay)
        self.trainee.compile(optimizer=opt, jit_compile=self.jit_compile, **self.task.compile_args(self.cfg))
        build_state(self.trainee, self.train)
        return what

    def _start_phase(self, i: int, mid_phase: bool, restored: bool) -> None:
        """Compile phase ``i``. ``mid_phase``: continue it from the last epoch (weights and optimizer);
        ``restored``: a resumed run entering a new phase (weights and seeds from the last epoch)."""
        phase = self.phases[i]
        what = self._compile(phase)
        if mid_phase or restored:
            load_resume(self.trainee, self.run_dir, optimizer=mid_phase)
        if phase.from_best and not mid_phase and (self.run_dir / A.BEST).exists():
            self.trainee.net.set_weights(keras.saving.load_model(self.run_dir / A.BEST).get_weights())
        trainable = sum(int(np.prod(w.shape)) for w in self.trainee.trainable_weights)
        self.log(f"phase {phase.name}: {phase.epochs} epochs at lr {phase.lr:g}, {what}, "
                 f"{trainable:,} trainable weights" + (" (resumed)" if mid_phase else ""))

    def run(self, state: LoopState) -> LoopState:
        history = History(self.run_dir / A.HISTORY, state.epochs_done)
        scalars = Scalars(self.run_dir / A.TENSORBOARD)
        twin = None
        resumed = state.epochs_done > 0
        first = state.phase_index + (1 if state.phase_finished else 0)
        try:
            for i in range(first, len(self.phases)):
                mid_phase = i == state.phase_index and not state.phase_finished and state.epoch_in_phase > 0
                if not mid_phase:
                    state.phase_index, state.epoch_in_phase, state.phase_finished = i, 0, False
                    state.controls, state.stopped = {}, False
                self._start_phase(i, mid_phase, restored=resumed and not mid_phase)
                resumed = False
                twin = self._run_phase(self.phases[i], state, history, scalars, twin)
            state.finished = True
            state.save(self.run_dir)
        finally:
            scalars.close()
            self.train.close()
            self.val.close()
        return state

    def _run_phase(self, phase: Phase, state: LoopState, history: History, scalars: Scalars, twin):
        known = Controls.__dataclass_fields__
        controls = (Controls(**{k: v for k, v in state.controls.items() if k in known}) if state.controls
                    else Controls(self.cfg.patience))
        times = []
        while state.epoch_in_phase < phase.epochs:
            row, seconds, stop, twin = self._epoch(phase, state, controls, twin)
            history.append(row)
            scalars.write(state.epochs_done, row)
            save_resume(self.trainee, self.run_dir)
            state.epochs_done += 1
            state.epoch_in_phase += 1
            state.controls = controls.state()
            state.stopped = stop
            state.phase_finished = stop or state.epoch_in_phase >= phase.epochs
            state.save(self.run_dir)
            times.append(seconds)
            if stop:
                self.log(f"early stop: {self.cfg.monitor} has not improved for {self.cfg.patience} epochs")
                break
        self._summary(phase, times)
        return twin

    def _epoch(self, phase: Phase, state: LoopState, controls: Controls, twin):
        opt = getattr(self.trainee.optimizer, "inner_optimizer", self.trainee.optimizer)
        lr = opt.base_learning_rate
        logs, seconds = fit_epoch(self.trainee, self.train, state.epochs_done,
                                  f"epoch {state.epochs_done + 1} [{phase.name}]  ")
        if self.after_epoch is not None:
            self.after_epoch(state.epochs_done, self.trainee.net)
        val = validate(self.trainee.net, self.val, self.task, self.cfg)
        row = {"epoch": state.epochs_done, "phase": PHASE_CODES[phase.name], "lr": lr,
               **{_plain(k): v for k, v in sorted(logs.items())}, **val}
        value = val.get(self.cfg.monitor, -np.inf)
        best = state.best is None or value > state.best
        if best:
            state.best, state.best_epoch = float(value), state.epochs_done
            twin = self._save_best(twin)
        stop, new_lr = controls.update(value, val["val_loss"], lr)
        if new_lr != lr:
            opt.learning_rate = new_lr  # the base rate: the warm-up ramp multiplies it
        n = len(self.train) * self.train.bs
        self.log(_line(state.epochs_done + 1, phase, row, seconds, n / seconds if seconds else 0.0, best))
        return row, seconds, stop, twin

    def _save_best(self, twin):
        net = self.save_model or self.trainee.net
        mixed = any("mixed" in str(layer.dtype_policy.name) for layer in net.layers)
        if mixed:
            twin = twin or float32_twin(net)
            twin.set_weights(net.get_weights())
        model = twin if mixed else net
        tmp = self.run_dir / f".{A.BEST}.tmp.keras"
        model.save(tmp)
        tmp.replace(self.run_dir / A.BEST)
        return twin

    def _summary(self, phase: Phase, times: list[float]) -> None:
        if not times:
            return
        n = len(self.train) * self.train.bs
        line = (f"phase {phase.name}: {len(times)} epochs, {n * len(times) / sum(times):.1f} images/s (training)"
                + (f", {n * (len(times) - 1) / sum(times[1:]):.1f} after the first epoch" if len(times) > 1 else ""))
        self.log(line)
        self.summaries.append(line)


def _plain(key: str) -> str:
    """Keras names multi-output metrics 'label_accuracy', 'mask_dice': keep the short names."""
    return {"label_accuracy": "accuracy", "mask_dice": "dice", "mask_iou": "iou"}.get(key, key)


def _line(epoch: int, phase: Phase, row: dict, seconds: float, ips: float, best: bool) -> str:
    keys = [k for k in ("loss", "accuracy", "dice", "val_loss", "val_accuracy", "val_macro_f1", "val_macro_auc",
                        "val_dice") if k in row]
    figures = "  ".join(f"{k} {row[k]:.4f}" for k in keys)
    return (f"epoch {epoch} [{phase.name}]  {figures}  lr {row['lr']:.2g}  {seconds:.1f} s ({ips:.0f} img/s)"
            + ("  * best" if best else ""))

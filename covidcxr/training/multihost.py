"""Multi-host training on JAX (``python -m covidcxr.train ... --distributed``).

Every process runs the same command. ``keras.distribution.initialize`` joins them into one JAX
cluster (from SLURM, the ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` / ``KERAS_DISTRIBUTION_NUM_PROCESSES`` /
``KERAS_DISTRIBUTION_PROCESS_ID`` variables, or ``--coordinator --num-processes --process-id``);
then ``keras.distribution.DataParallel`` spans every device of every host (``jax.devices()`` is
global after initialize). ``--batch-size`` is the global batch: process p of n feeds rows
``[p*b/n, (p+1)*b/n)`` of every global batch (the batch order is a function of seed and epoch
only, training/data.py), and Keras assembles the global batch with
``jax.make_array_from_process_local_data``, so a run's history equals a single-process run
over the same devices, up to float reduction order. Validation: every process validates the whole
validation set on the replicated weights (identical figures everywhere; no gather needed).

Only process 0 writes the run folder, checkpoints, logs and export; the others keep their
per-epoch files (resume state, best checkpoint) in a scratch folder of their own that is removed
at the end. ``--resume`` reads the run folder on every process (a shared filesystem, or a copy).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from covidcxr import artifacts as A
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.training import devices as D

ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
REFUSED_BACKEND = ("--distributed trains on the JAX backend only: run it with KERAS_BACKEND=jax (Keras 3.15 has "
                   "no working multi-worker path on {backend}: MultiWorkerMirroredStrategy is broken with Keras 3, "
                   "keras issue #20585).")


class RunFailed(CovidCXRError):
    """A distributed run that stopped on an error of this or another process (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Launch:
    """How to join the cluster: explicit values, or None to let Keras/JAX read the environment/SLURM."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class Cluster:
    process_id: int = 0
    num_processes: int = 1
    host: str = ""
    distributed: bool = False

    def name(self) -> str:
        return f"process {self.process_id} of {self.num_processes} ({self.host})"


_current = Cluster(host=socket.gethostname())


def current() -> Cluster:
    return _current


def is_writer() -> bool:
    """Whether this process writes the run folder (process 0, or a run that is not distributed)."""
    return _current.process_id == 0


def launch_from_args(distributed: bool, coordinator: str | None, num_processes: int | None,
                     process_id: int | None, backend: str) -> Launch | None:
    """Check the --distributed flags; None when the run is not distributed."""
    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if not distributed:
        if given:
            raise ConfigError(f"{', '.join(given)} configure multi-host training: add --distributed.")
        return None
    if backend != "jax":
        raise ConfigError(REFUSED_BACKEND.format(backend={"torch": "PyTorch"}.get(backend, "TensorFlow")))
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise ConfigError(f"--distributed with {', '.join(given)} also needs {', '.join(missing)} (give all three, "
                          f"or none to read SLURM or the {'/'.join(ENV)} variables).")
    if given:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator {coordinator}: expected HOST:PORT (process 0's address), "
                              f"e.g. 10.0.0.1:1234.")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} --num-processes {num_processes}: need num-processes >= 1 "
                              f"and 0 <= process-id < num-processes.")
    return Launch(coordinator, num_processes, process_id)


def start(launch: Launch | None) -> Cluster:
    """Join the cluster (a no-op for None). Must run before any JAX computation."""
    global _current
    if launch is None:
        return _current
    import jax  # only on the JAX backend

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        with contextlib.suppress(Exception):  # cross-process collectives on CPU devices (the default in new JAX)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        keras.distribution.initialize(launch.coordinator, launch.num_processes, launch.process_id)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--distributed: could not join the cluster ({str(exc).strip()[:300]}). Give --coordinator "
                          f"HOST:PORT --num-processes N --process-id I, set {', '.join(ENV)}, or launch under SLURM "
                          f"(srun, one task per node).") from None
    _current = Cluster(jax.process_index(), jax.process_count(), socket.gethostname(), True)
    return _current


def check_config(cfg) -> None:
    """What a distributed run cannot do (refused, never ignored)."""
    if not _current.distributed:
        return
    if cfg.freeze_encoder:
        raise ConfigError("--freeze-encoder (a linear probe on cached embeddings) trains on one process: drop "
                          "--distributed.")
    if cfg.crop is A.LungCrop.MODEL:
        raise ConfigError("--lung-crop SEGMENTER predicts masks into the run folder before training, on one process: "
                          "use --lung-crop given (masks in the data) with --distributed.")
    n = _device_count()
    if cfg.batch_size % n:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the {n} devices of "
                          f"the {_current.num_processes} processes.")


def _device_count() -> int:
    import jax  # only on the JAX backend

    return jax.device_count()


def distribution_scope(device: D.Device, batch_size: int):
    """DataParallel over every device of every process; else what devices.py picks for one process."""
    if not _current.distributed:
        return D.distribution_scope(device, batch_size)
    import jax  # only on the JAX backend

    dist = keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    keras.distribution.set_distribution(dist)
    n = _current.num_processes
    return contextlib.nullcontext(), (f"DataParallel over {jax.device_count()} devices of {n} "
                                      f"process{'es' if n > 1 else ''} (this is {_current.name()})")


def local_rows(batch_size: int) -> slice | None:
    """This process's rows of every global batch (None: the whole batch)."""
    if not _current.distributed:
        return None
    b = batch_size // _current.num_processes
    return slice(_current.process_id * b, (_current.process_id + 1) * b)


def agreed(fn, *args):
    """``fn(*args)`` on every process; if it raises a CovidCXRError on any, every process stops
    (the failing one with its own error, the others naming it) instead of waiting for it in training."""
    if not _current.distributed:
        return fn(*args)
    from jax.experimental import multihost_utils  # only on the JAX backend

    try:
        result, error = fn(*args), None
    except CovidCXRError as exc:
        result, error = None, exc
    ok = np.asarray(multihost_utils.process_allgather(np.array([error is None], np.int32))).reshape(-1)
    if error is not None:
        raise error
    if not ok.all():
        bad = ", ".join(str(i) for i in np.flatnonzero(ok == 0))
        raise ConfigError(f"process {bad} of {_current.num_processes} refused to start (see its error).")
    return result


def scratch(run_dir: Path, resume: bool) -> Path:
    """A non-writing process's own folder for its per-epoch files; on --resume a copy of the run folder."""
    work = Path(tempfile.mkdtemp(prefix=f"covidcxr-process{_current.process_id}-"))
    if resume:
        shutil.copytree(run_dir, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(A.TENSORBOARD))
    return work


def local_only() -> None:
    """After the last epoch: process 0 scores and exports on its own devices (the others have left)."""
    if _current.distributed:
        keras.distribution.set_distribution(None)


def replica_log(log):
    """Non-writing processes print only warnings and errors (stderr), named; process 0 prints everything."""
    if is_writer():
        return log

    def quiet(*args, **kwargs):
        if kwargs.get("file") is sys.stderr:
            log(f"[{_current.name()}]", *args, **kwargs)
    return quiet


def weight_digest(epoch: int, model) -> None:
    """Every process prints a digest of its copy of the weights after each epoch (they must agree)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    print(f"{_current.name()}: epoch {epoch + 1} weights sha256 {h.hexdigest()[:16]}", flush=True)


def named(exc: BaseException) -> BaseException:
    """An error of a distributed run, as one line naming this process."""
    if not _current.distributed or isinstance(exc, KeyboardInterrupt):
        return exc
    if isinstance(exc, CovidCXRError):
        err = type(exc)(f"{_current.name()}: {exc}")
        err.exit_code = getattr(exc, "exit_code", 2)
        return err
    return RunFailed(f"{_current.name()}: the run stopped: {type(exc).__name__}: {str(exc).strip()[:400]} (a lost "
                     f"connection means another process died or failed: see its log). Continue with --resume once "
                     f"every process is back.")


def end(code: int) -> int:
    """A distributed process that failed exits at once: JAX's shutdown barrier would wait for the others."""
    if _current.distributed and code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

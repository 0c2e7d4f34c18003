"""What the run trains on, per Keras backend: accelerator, mixed precision, XLA, several devices.

Defaults follow the hardware. On a GPU: mixed precision (bfloat16 where the GPU has it,
Ampere and newer; float16 with loss scaling before that) and XLA compilation are on;
``--no-mixed-precision`` / ``--no-jit-compile`` turn them off. On a CPU both are off unless
asked for. Several GPUs: ``tf.distribute.MirroredStrategy`` on TensorFlow,
``keras.distribution.DataParallel`` on JAX; PyTorch trains on one device.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
import random

import keras
from keras.src.backend.common import global_state
from keras.src.random import seed_generator
import numpy as np

from covidcxr.errors import ConfigError


@dataclass
class Device:
    backend: str
    kind: str          # cpu | gpu | tpu
    count: int
    name: str
    bf16: bool

    def describe(self) -> str:
        what = self.name if self.count == 1 else f"{self.count} x {self.name}"
        return f"{what} ({self.backend} backend)"


def _gpu_bf16_tf(tf) -> bool:
    try:
        cc = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])["compute_capability"]
        return tuple(cc) >= (8, 0)
    except Exception:
        return False


def detect() -> Device:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # only on the JAX backend

        devs = jax.devices()
        kind = devs[0].platform
        kind = "gpu" if kind in ("gpu", "cuda", "rocm") else kind
        name = getattr(devs[0], "device_kind", kind)
        bf16 = kind == "tpu" or (kind == "gpu" and not any(old in name for old in ("V100", "T4", "P100", "K80")))
        return Device(backend, kind, len(devs), name, bf16)
    if backend == "torch":
        import torch  # only on the PyTorch backend

        if torch.cuda.is_available():
            return Device(backend, "gpu", torch.cuda.device_count(), torch.cuda.get_device_name(0),
                          torch.cuda.is_bf16_supported())
        return Device(backend, "cpu", 1, "CPU", False)
    import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        return Device(backend, "tpu", 1, "TPU", True)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return Device(backend, "gpu", len(gpus), "GPU", _gpu_bf16_tf(tf))
    return Device(backend, "cpu", 1, "CPU", False)


def precision_policy(device: Device, requested: bool | None) -> str:
    """'float32', 'mixed_bfloat16' or 'mixed_float16'."""
    on = (device.kind in ("gpu", "tpu")) if requested is None else requested
    if not on:
        return "float32"
    return "mixed_bfloat16" if device.bf16 or device.kind == "cpu" else "mixed_float16"


def use_jit(device: Device, requested: bool | None) -> bool:
    if requested is not None:
        return requested
    return device.kind in ("gpu", "tpu") and device.backend != "torch"


def distribution_scope(device: Device, batch_size: int):
    """A context in which to build and compile the model for several devices (else a no-op)."""
    if device.count <= 1 or device.kind == "cpu":
        return contextlib.nullcontext(), ""
    if device.backend == "tensorflow":
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        strategy = tf.distribute.MirroredStrategy() if device.kind == "gpu" else _tpu_strategy(tf)
        return strategy.scope(), f"{type(strategy).__name__} over {strategy.num_replicas_in_sync} devices"
    if device.backend == "jax":
        if batch_size % device.count:
            raise ConfigError(f"--batch-size {batch_size} must be a multiple of the {device.count} devices.")
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext(), f"DataParallel over {device.count} devices"
    return contextlib.nullcontext(), "PyTorch backend: training on one device"


def _tpu_strategy(tf):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def make_deterministic(seed: int, device: Device) -> None:
    """Seed every generator; on a TensorFlow CPU also ask for deterministic kernels, so CPU runs
    repeat exactly (on a GPU some kernels still vary, see README)."""
    if device.backend == "tensorflow":
        keras.utils.set_random_seed(seed)
    else:  # keras.utils.set_random_seed also imports TensorFlow when it is installed: not on JAX/PyTorch
        global_state.set_global_attribute("global_random_seed", seed)
        global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
        random.seed(seed)
        np.random.seed(seed)
        if device.backend == "torch":
            import torch  # only on the PyTorch backend

            torch.manual_seed(seed)
    if device.backend == "tensorflow" and device.kind == "cpu":
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        try:
            tf.config.experimental.enable_op_determinism()
        except Exception:
            pass

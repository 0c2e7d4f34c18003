"""The progress line inside a training epoch: how often it is written to a log file and to a terminal,
and that it runs inside a real ``fit`` on every backend installed (TensorFlow, JAX, PyTorch)."""
import importlib.util
import io
import os
import subprocess
import sys

import pytest

from covidcxr.training.progress import StepProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _epoch(progress: StepProgress, clock: Clock, steps: int, seconds_per_step: float) -> None:
    progress.on_train_begin()
    for k in range(steps):
        clock.now += seconds_per_step
        progress.on_train_batch_end(k, {"loss": 1.0 / (k + 1)})
    progress.on_train_end()


def test_log_file_gets_at_most_one_line_per_10_s_and_per_10_percent():
    clock, out = Clock(), io.StringIO()
    _epoch(StepProgress(1000, 32, "epoch 1 [head]  ", out, tty=False, clock=clock), clock, 1000, 0.5)
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 10 and "\r" not in out.getvalue()  # 500 s: every 10% (50 s), not every 10 s
    assert lines[0].startswith("epoch 1 [head]  step 100/1000  64.0 img/s  loss 0.0100")
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert all(b - a >= 100 for a, b in zip(steps, steps[1:])) and steps[-1] < 1000  # the epoch line says the end

    clock, out = Clock(), io.StringIO()
    _epoch(StepProgress(20, 8, stream=out, tty=False, clock=clock), clock, 20, 30.0)  # slow steps: every 10 s cap
    assert len(out.getvalue().splitlines()) == 9  # steps 2, 4, ..., 18 (10% = 2 steps)
    clock, out = Clock(), io.StringIO()
    _epoch(StepProgress(50, 8, stream=out, tty=False, clock=clock), clock, 50, 0.1)  # a 5 s epoch: nothing
    assert out.getvalue() == ""


def test_terminal_line_is_redrawn_in_place_and_wiped():
    clock, out = Clock(), io.StringIO()
    _epoch(StepProgress(100, 4, stream=out, tty=True, clock=clock), clock, 100, 0.1)
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") <= 2 + 100 * 0.1 / 0.5 + 1
    assert "step 0/100" in text and "step 100/100" in text and "40.0 img/s" in text
    assert text.endswith("\r") and text.rsplit("\r", 2)[-2].strip() == ""  # wiped before the epoch's line


FIT = """
import sys
import numpy as np, keras
from covidcxr.training import progress
progress.LOG_EVERY_S = 0.0
x, y = np.random.rand(40, 4).astype("float32"), np.random.rand(40, 1).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[progress.StepProgress(10, 4, "", sys.stdout, tty=False)])
print("backend", keras.backend.backend())
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_progress_inside_a_real_fit(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    r = subprocess.run([sys.executable, "-c", FIT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KERAS_BACKEND": backend})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    steps = [int(line.split()[1].split("/")[0]) for line in lines]  # every 10% (JAX may skip a late one), not the last
    assert len(steps) >= 3 and steps == sorted(set(steps)) and set(steps) <= set(range(1, 10))
    assert all("img/s  loss " in line for line in lines) and f"backend {backend}" in r.stdout

"""Progress inside a training epoch: step k/N, images/s and the running loss, on stderr.

A Keras callback, so it runs the same on the TensorFlow, JAX and PyTorch backends. On a terminal
one line is redrawn in place (at most every ``TTY_EVERY_S``) and wiped before the epoch's own line;
in a log file (not a TTY) a line is written only when ``LOG_EVERY_S`` seconds *and* a
``LOG_EVERY_FRACTION`` of the steps have passed since the last one, so an epoch leaves at most ten
lines, a short one none. It only reads the logs it is given, so JAX keeps dispatching steps
asynchronously (``async_safe``).
"""
from __future__ import annotations

import sys
import threading
import time

import keras

TTY_EVERY_S = 0.5
LOG_EVERY_S = 10.0
LOG_EVERY_FRACTION = 0.1


class StepProgress(keras.callbacks.Callback):
    async_safe = True

    def __init__(self, steps: int, batch_size: int, label: str = "", stream=None, tty: bool | None = None,
                 clock=time.perf_counter):
        super().__init__()
        self.steps, self.batch_size, self.label = int(steps), int(batch_size), label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.clock = clock
        self._lock = threading.Lock()
        self._t0 = self._last = 0.0
        self._last_step, self._width = 0, 0

    def on_train_begin(self, logs=None):
        self._t0 = self._last = self.clock()
        self._last_step, self._width = 0, 0
        if self.tty:
            self._write(self.text(0, None, self._t0))

    def on_train_batch_end(self, batch, logs=None):
        k = batch + 1
        with self._lock:  # JAX may run these from worker threads, a late one after a newer step's
            if k <= self._last_step:
                return
            now = self.clock()
            if self.tty:
                due = now - self._last >= TTY_EVERY_S or k == self.steps
            else:  # the epoch's own line follows the last step at once
                due = (k < self.steps and now - self._last >= LOG_EVERY_S
                       and k - self._last_step >= LOG_EVERY_FRACTION * self.steps)
            if due:
                self._last, self._last_step = now, k
                self._write(self.text(k, (logs or {}).get("loss"), now))

    def on_train_end(self, logs=None):
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def text(self, k: int, loss, now: float) -> str:
        elapsed = now - self._t0
        rate = k * self.batch_size / elapsed if k and elapsed > 0 else 0.0
        eta = (self.steps - k) * elapsed / k if k else None
        return (f"{self.label}step {k}/{self.steps}  {rate:.1f} img/s"
                + (f"  loss {float(loss):.4f}" if loss is not None else "")
                + f"  {elapsed:.0f} s" + (f", about {eta:.0f} s to go" if eta is not None and k < self.steps else ""))

    def _write(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

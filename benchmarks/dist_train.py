"""Two-process JAX training (``train --distributed``, one CPU device per process, coordinated on
127.0.0.1) against one process with two devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``)
on the same global batch: training images/s after the first epoch, and their ratio.

    python benchmarks/dist_train.py [--per-class 24] [--image-size 64] [--batch-size 16] [--epochs 4]

Each configuration runs alone (the pair's two processes together), on generated data, with the input
cache built beforehand. On one CPU the pair cannot be faster (the two processes share its cores and add
a gloo all-reduce per step); the figure measures the cost of the cross-process path.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"phase scratch: \d+ epochs, [\d.]+ images/s \(training\), ([\d.]+) after the first epoch")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(a, data: Path, run_dir: Path, n: int, pid: int, port: int) -> list[str]:
    return [sys.executable, "-m", "covidcxr.train", "--data", str(data), "--arch", a.arch, "--weights", "none",
            "--epochs", str(a.epochs), "--fine-tune-epochs", "0", "--image-size", str(a.image_size),
            "--batch-size", str(a.batch_size), "--export-dir", "none", "--workers", "1", "--run-dir", str(run_dir),
            "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(pid)]


def _run(cmds: list[list[str]], env: dict) -> tuple[float, float]:
    """(training images/s after the first epoch, wall s) of processes started together."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"failed ({p.returncode}):\n{out[-1500:]}\n{err[-2000:]}")
    return float(RATE.search(outs[0][0]).group(1)), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mobilenetv3small")
    p.add_argument("--per-class", type=int, default=24)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from covidcxr.data.synth import write_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    data = write_synthetic_dataset(tmp / "data", per_class=a.per_class, size=max(64, a.image_size), seed=1,
                                   progress=False)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "COVIDCXR_CACHE": str(tmp / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    two_dev = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    one, one_wall = _run([_cmd(a, data, tmp / "one", 1, 0, _port())], two_dev)  # also builds the cache
    port = _port()
    pair, pair_wall = _run([_cmd(a, data, tmp / "pair", 2, i, port) for i in (0, 1)], env)
    print(f"{a.arch} {a.image_size} px, global batch {a.batch_size}, {a.epochs} epochs, {4 * a.per_class} images")
    print(f"one process, two devices: {one:.1f} images/s after the first epoch ({one_wall:.0f} s wall)")
    print(f"two processes, one device each: {pair:.1f} images/s after the first epoch ({pair_wall:.0f} s wall)")
    print(f"ratio two processes / one process: {pair / one:.2f}x")


if __name__ == "__main__":
    main()

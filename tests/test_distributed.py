"""``train --distributed``: two JAX processes on this machine (one CPU device each, coordinated by
keras.distribution.initialize on 127.0.0.1) train like one process with two devices on the same
global batch; only process 0 writes; the flags are checked; other backends are refused."""
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import ConfigError
from covidcxr.training import multihost
from covidcxr.training.data import Batches, open_run_data

TRAIN = ["-m", "covidcxr.train", "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "2",
         "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8", "--export-dir", "none",
         "--workers", "1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, cwd, env):
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _done(p, what, timeout=240):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{what}\n{out[-1500:]}\n{err[-3000:]}"
    return out


def _digests(out: str) -> list[str]:
    return re.findall(r"epoch \d+ weights sha256 ([0-9a-f]+)", out)


def test_two_processes_train_as_one_with_two_devices(synth_dir, tmp_path):
    jax = pytest.importorskip("jax")
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        pytest.skip("this JAX build has no cross-process collectives on CPU devices (jax_cpu_collectives_"
                    "implementation): a two-process run cannot be tested on a CPU")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TMPDIR": str(scratch), "COVIDCXR_CACHE": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu"}
    data = ["--data", str(synth_dir)]
    port, ref_port = _port(), _port()
    pair = [_start([*TRAIN, *data, "--run-dir", "pair", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", "2", "--process-id", str(i)], tmp_path, env) for i in (0, 1)]
    one = _start([*TRAIN, *data, "--run-dir", "one", "--distributed", "--coordinator", f"127.0.0.1:{ref_port}",
                  "--num-processes", "1", "--process-id", "0"], tmp_path,
                 {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    out0, out1 = (_done(p, f"process {i}") for i, p in enumerate(pair))
    ref = _done(one, "one process, two devices")

    assert "DataParallel over 2 devices of 2 processes" in out0
    assert "DataParallel over 2 devices of 1 process" in ref
    d0, d1 = _digests(out0), _digests(out1)
    assert len(d0) == 2 and d0 == d1  # both processes hold the same weights after each epoch
    assert "run directory" not in out1 and "epoch 1 [scratch]  loss" not in out1  # process 1 reports nothing else

    h, r = pd.read_csv(tmp_path / "pair" / "history.csv"), pd.read_csv(tmp_path / "one" / "history.csv")
    assert list(h.columns) == list(r.columns) and len(h) == 2
    np.testing.assert_allclose(h.to_numpy(float), r.to_numpy(float), rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "one", "pair", "tmp"]  # one run folder per run
    assert (tmp_path / "pair" / "best.keras").exists() and (tmp_path / "pair" / "metrics.json").exists()
    assert not list(scratch.glob("covidcxr-process*"))  # process 1's scratch folder is gone


def test_refused_on_tensorflow(tmp_path):
    pytest.importorskip("tensorflow")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    r = subprocess.run([sys.executable, "-m", "covidcxr.train", "--distributed"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and not list(tmp_path.iterdir())
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --distributed trains on the JAX backend only") and "KERAS_BACKEND=jax" in lines[-1]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kwargs, message", [
    (dict(distributed=False, coordinator="h:1"), "add --distributed"),
    (dict(distributed=False, process_id=0), "add --distributed"),
    (dict(coordinator="h:1"), "also needs --num-processes, --process-id"),
    (dict(coordinator="h", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "0 <= process-id < num-processes"),
    (dict(backend="torch"), "no working multi-worker path on PyTorch"),
])
def test_flags_are_checked(kwargs, message):
    args = dict(distributed=True, coordinator=None, num_processes=None, process_id=None, backend="jax") | kwargs
    with pytest.raises(ConfigError, match=re.escape(message)):
        multihost.launch_from_args(*args.values())


def test_flags_accepted():
    assert multihost.launch_from_args(False, None, None, None, "tensorflow") is None
    assert multihost.launch_from_args(True, None, None, None, "jax") == multihost.Launch()  # SLURM / KERAS_* vars
    assert multihost.launch_from_args(True, "10.0.0.1:1234", 2, 1, "jax") == multihost.Launch("10.0.0.1:1234", 2, 1)


def test_each_process_feeds_its_rows_of_every_global_batch(synth_dir, tmp_path, monkeypatch):
    df = pd.DataFrame({"path": sorted(str(p) for p in synth_dir.rglob("images/*.png"))})
    df["label"], df["split"] = "COVID", "train"
    data = open_run_data(df, ["COVID"], 32, "none", cache_dir=tmp_path, workers=1, progress=False)
    rows = data.rows("train")
    whole = Batches(data, rows, 8, shuffle=True, seed=7, prefetch=0)
    parts = []
    for pid in (0, 1):
        monkeypatch.setattr(multihost, "_current", multihost.Cluster(pid, 2, "h", True))
        assert not multihost.is_writer() if pid else multihost.is_writer()
        parts.append(Batches(data, rows, 8, shuffle=True, seed=7, prefetch=0, shard=multihost.local_rows(8)))
    for b in (whole, *parts):
        b.set_epoch(3)
    assert len(parts[0]) == len(parts[1]) == len(whole) == len(rows) // 8
    for i in range(len(whole)):
        x, y = whole[i]
        (x0, y0), (x1, y1) = parts[0][i], parts[1][i]
        assert len(x0["image"]) == len(x1["image"]) == 4
        np.testing.assert_array_equal(np.concatenate([x0["image"], x1["image"]]), x["image"])
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)

"""The JAX backend end to end on the CPU: train -> evaluate (with Grad-CAM) -> predict -> export
(the exporter runs under TensorFlow), each as a user runs it, and the SavedModel served under
TensorFlow agrees with what JAX predicted."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("jax")


def _run(args, cwd, backend="jax", timeout=400):
    env = {**os.environ, "KERAS_BACKEND": backend}
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    return r


def test_jax_train_evaluate_predict_export(synth_dir, tmp_path):
    r = _run(["covidcxr.train", "--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "none",
              "--epochs", "2", "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8",
              "--run-dir", "run", "--export-dir", "export"], tmp_path)
    assert "(jax backend)" in r.stdout and "exporting under the TensorFlow backend" in r.stdout
    assert "Traceback" not in r.stderr and "absl::InitializeLog" not in r.stderr  # quiet start-up
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["backend"] == "jax" and (tmp_path / "export" / "serving" / "1" / "saved_model.pb").exists()
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 2

    _run(["covidcxr.evaluate", "--model", "run", "--bootstrap", "20", "--gradcam", "1", "--out", "ev"], tmp_path)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] > 0 and m["gradcam"]["files"]

    images = sorted(str(p) for p in synth_dir.rglob("images/*.png"))[:10]
    _run(["covidcxr.predict", "--model", "run", *images, "--out", "jax.csv", "--quiet"], tmp_path)
    _run(["covidcxr.predict", "--model", "export/serving/1", *images, "--out", "tf.csv", "--quiet"], tmp_path,
         backend="tensorflow")
    a, b = pd.read_csv(tmp_path / "jax.csv"), pd.read_csv(tmp_path / "tf.csv")
    cols = [c for c in a.columns if c.startswith("prob_")]
    assert list(a["path"]) == list(b["path"]) and len(a) == 10
    assert np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() < 1e-4

"""The experiment scripts run end to end at a tiny size."""
import subprocess
import sys

import pandas as pd

from tests.conftest import REPO


def test_label_efficiency_curve(synth_dir, tmp_path):
    out = tmp_path / "le"
    cmd = [sys.executable, str(REPO / "experiments" / "label_efficiency.py"), "--arch", "mobilenetv3small",
           "--data", str(synth_dir), "--fractions", "0.5,1.0", "--seeds", "0", "--out", str(out), "--",
           "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--fine-tune-epochs", "0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    df = pd.read_csv(out / "results.csv")
    assert list(df["fraction"]) == [0.5, 1.0]
    assert df["train_images"].iloc[0] < df["train_images"].iloc[1]
    assert df["val_macro_f1"].between(0, 1).all() and (out / "label_efficiency.png").exists()
    assert df["test_macro_f1"].between(0, 1).all() and (df["wall_seconds"] > 0).all()
    assert (out / "frac0.5-seed0" / "wall_seconds.txt").exists()


def test_ssl_vs_scratch_script_refuses_an_unknown_step(tmp_path):
    r = subprocess.run(["bash", str(REPO / "experiments" / "ssl_vs_scratch.sh"), "bogus"], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert r.returncode == 2 and "unknown step bogus" in r.stderr

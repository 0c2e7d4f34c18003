import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr import train
from tests.conftest import shared_path

TINY = ["--image-size", "32", "--batch-size", "8", "--cache", "memory"]


def run(args, cwd=None):
    return train.main(args)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_end_to_end_scratch_run_export_and_predict(synth_dir, in_tmp, capsys):
    rc = run(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
              "--fine-tune-epochs", "1", "--run-dir", "r1", "--export-dir", "exp", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "weights none: the whole network trains from epoch 1" in out and "images/s" in out
    r = in_tmp / "r1"
    for f in ("config.json", "manifest.csv", "history.csv", "best.keras", "curves.png", "metrics.json",
              "labels.json"):
        assert (r / f).exists(), f
    assert (r / "tensorboard").is_dir()
    cfg = json.loads((r / "config.json").read_text())
    assert cfg["weights"] == "none" and cfg["arch"] == "mobilenetv3small" and cfg["image_size"] == 32
    hist = pd.read_csv(r / "history.csv")
    assert len(hist) == 2 and "val_macro_f1" in hist
    m = json.loads((r / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"accuracy", "macro_f1", "weighted_f1", "macro_auc", "per_class"} <= set(m[split])
        assert len(m[split]["per_class"]) == 4
    assert (in_tmp / "exp" / "serving" / "1" / "saved_model.pb").exists()
    assert json.loads((in_tmp / "exp" / "labels.json").read_text())["classes"][0] == "COVID"

    # The SavedModel serves raw PNG bytes, any size, and agrees with the Keras model.
    import tensorflow as tf

    from covidcxr.predict import Predictor

    png = next(Path(synth_dir, "Normal", "images").glob("*.png"))
    fn = tf.saved_model.load(str(in_tmp / "exp" / "serving" / "1")).signatures["serving_default"]
    res = fn(image_bytes=tf.constant([png.read_bytes(), png.read_bytes()]))
    assert res["probabilities"].shape == (2, 4) and res["label"].dtype == tf.string
    np.testing.assert_allclose(res["probabilities"].numpy().sum(1), 1.0, atol=1e-5)
    from covidcxr.data.imageio import read_image

    keras_p = Predictor(in_tmp / "exp").predict(read_image(png))
    np.testing.assert_allclose(keras_p, res["probabilities"].numpy()[0], atol=1e-4)

    from covidcxr.predict import main as predict_main

    bad = in_tmp / "bad.png"
    bad.write_bytes(b"nope")
    assert predict_main(["--model", "exp", str(png.parent), str(bad), "--out", "p.csv"]) == 0
    p = pd.read_csv(in_tmp / "p.csv")
    assert len(p) == 8 and list(p.columns[:2]) == ["path", "label"] and p.filter(like="prob_").shape[1] == 4
    assert "bad.png" in capsys.readouterr().err

    # Nothing is overwritten without --overwrite.
    assert run(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--run-dir", "r1", *TINY]) == 2
    assert "already exists" in capsys.readouterr().err


def test_two_phase_with_local_weights_file(synth_dir, in_tmp, capsys):
    import keras

    from covidcxr.models.registry import build_backbone, get_spec

    bb = build_backbone(get_spec("resnet50"), 32, None)
    bb.save_weights(in_tmp / "bb.weights.h5")
    keras.backend.clear_session()
    rc = run(["--data", str(synth_dir), "--arch", "resnet50", "--weights", str(in_tmp / "bb.weights.h5"),
              "--epochs", "1", "--fine-tune-epochs", "1", "--unfreeze", "20", "--run-dir", "r2",
              "--export-dir", "none", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("phase ")]
    head = next(l for l in lines if l.startswith("phase head:"))
    fine = next(l for l in lines if l.startswith("phase finetune:") and "epochs" in l)
    import re

    count = lambda l: int(re.search(r"([\d,]+) trainable", l).group(1).replace(",", ""))  # noqa: E731
    assert count(fine) > count(head)
    hist = pd.read_csv(in_tmp / "r2" / "history.csv")
    assert hist["phase"].tolist() == [1, 2]
    assert hist["lr"].iloc[1] == pytest.approx(hist["lr"].iloc[0] / 10, rel=1e-3)


def test_resume_continues_a_killed_run(synth_dir, in_tmp):
    cmd = [sys.executable, "-m", "covidcxr.train", "--data", str(synth_dir), "--arch", "mobilenetv3small",
           "--weights", "none", "--epochs", "4", "--fine-tune-epochs", "0", "--run-dir", "r3",
           "--export-dir", "none", "--patience", "50", *TINY]
    proc = subprocess.Popen(cmd, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = in_tmp / "r3" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if json.loads(state.read_text())["epoch"] >= 1:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["epoch"]
    assert 1 <= done < 4 and "finished" not in json.loads(state.read_text())
    r = subprocess.run([sys.executable, "-m", "covidcxr.train", "--resume", "--run-dir", "r3"], cwd=in_tmp,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    hist = pd.read_csv(in_tmp / "r3" / "history.csv")
    assert sorted(hist["epoch"].tolist()) == [0, 1, 2, 3]
    assert json.loads(state.read_text())["finished"] is True


def test_cli_errors(synth_dir, in_tmp, capsys):
    assert run(["--arch", "nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
    assert run(["--data", str(in_tmp / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = in_tmp / "w.h5"
    bad.write_bytes(b"garbage")
    assert run(["--data", str(synth_dir), "--arch", "resnet50", "--weights", str(bad), "--run-dir", "r4",
                *TINY]) == 2
    assert "cannot load it into resnet50" in capsys.readouterr().err
    assert run(["--resume", "--run-dir", "nothing-here"]) == 2
    assert "no interrupted run" in capsys.readouterr().err
    (in_tmp / "empty").mkdir()
    assert run(["--data", str(in_tmp / "empty"), "--run-dir", "r5", *TINY]) == 2
    assert "unknown dataset layout" in capsys.readouterr().err


def test_help_lists_flags_and_archs():
    r = subprocess.run([sys.executable, "-m", "covidcxr.train", "--help"], capture_output=True, text=True)
    for flag in ("--data", "--arch", "--task", "--image-size", "--batch-size", "--epochs", "--fine-tune-epochs",
                 "--unfreeze", "--lr", "--weights", "--seed", "--run-dir", "--export-dir", "--overwrite",
                 "--resume", "efficientnetb0", "swin_tiny"):
        assert flag in r.stdout


def test_trains_on_real_covid_qu_ex(in_tmp):
    root = shared_path("covid-qu-ex-sample")
    rc = run(["--data", str(root), "--arch", "resnet18", "--weights", "none", "--epochs", "1",
              "--fine-tune-epochs", "0", "--run-dir", "real", "--export-dir", "none", *TINY])
    assert rc == 0
    m = json.loads((in_tmp / "real" / "metrics.json").read_text())
    assert m["val"]["n"] == 60 and m["test"]["n"] == 60  # the dataset's own Val and Test
    assert set(m["val"]["per_class"]) == {"COVID-19", "Non-COVID", "Normal"}

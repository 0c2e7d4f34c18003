"""Training from the command line: run folder, export, same seed same history, kill and resume,
two phases, and every bad start refused before a folder is made."""
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

TINY = ["--image-size", "32", "--batch-size", "8"]
SCRATCH = ["--arch", "mobilenetv3small", "--weights", "none", "--epochs", "3", "--fine-tune-epochs", "0",
           "--patience", "50", *TINY]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def reference(synth_dir, tmp_path_factory):
    """One uninterrupted 3-epoch run with its export (module-wide, reused by several tests); it keeps its
    resume state so that the tests can extend it."""
    root = tmp_path_factory.mktemp("ref")
    assert train.main(["--data", str(synth_dir), *SCRATCH, "--run-dir", str(root / "run"),
                       "--export-dir", str(root / "export"), "--keep-resume-state"]) == 0
    return root


def test_run_folder_and_export(reference, synth_dir, capsys):
    r = reference / "run"
    for f in ("config.json", "manifest.csv", "model_card.json", "history.csv", "best.keras", "curves.png",
              "metrics.json", "state.json", "resume.npz", "train_fingerprints.npz", "architecture.json"):
        assert (r / f).exists(), f
    assert any((r / "tensorboard").iterdir())
    cfg = json.loads((r / "config.json").read_text())
    assert cfg["weights"] == "none" and cfg["arch"] == "mobilenetv3small" and cfg["image_size"] == 32
    card = json.loads((r / "model_card.json").read_text())
    assert card["classes"][0] == "COVID" and card["input_format"] == "gray255" and card["backend"] == "tensorflow"
    hist = pd.read_csv(r / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2] and {"loss", "accuracy", "val_loss", "val_macro_f1"} <= set(hist)
    m = json.loads((r / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"accuracy", "macro_f1", "weighted_f1", "macro_auc", "per_class"} <= set(m[split])
    fp = np.load(r / "train_fingerprints.npz")
    man = pd.read_csv(r / "manifest.csv")
    assert (fp["role"] == 0).sum() == (man["split"] == "train").sum() and fp["thumbs16"].shape[1:] == (16, 16)

    # The SavedModel serves raw PNG bytes of any size and agrees with the Keras model.
    import tensorflow as tf

    from covidcxr.inference import Item, Predictor

    png = next(Path(synth_dir, "Normal", "images").glob("*.png"))
    fn = tf.saved_model.load(str(reference / "export" / "serving" / "1")).signatures["serving_default"]
    res = fn(image_bytes=tf.constant([png.read_bytes(), png.read_bytes()]))
    assert res["probabilities"].shape == (2, 4) and res["label"].dtype == tf.string
    keras_p = next(Predictor(reference / "export").run([Item(str(png))])).probs[0]
    np.testing.assert_allclose(keras_p, res["probabilities"].numpy()[0], atol=1e-5)
    assert (reference / "export" / "train_fingerprints.npz").exists()  # the overlap guard travels with the export
    assert (r / "MODEL_CARD.md").exists() and (reference / "export" / "MODEL_CARD.md").exists()


def test_nothing_is_overwritten(reference, synth_dir, capsys):
    assert train.main(["--data", str(synth_dir), *SCRATCH, "--run-dir", str(reference / "run")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert train.main(["--data", str(synth_dir), *SCRATCH, "--run-dir", str(reference / "other"),
                       "--export-dir", str(reference / "export")]) == 2
    assert "export directory" in capsys.readouterr().err and not (reference / "other").exists()


def _wait_for_epoch(state: Path, proc, n: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["epochs_done"] >= n:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    return False


def test_same_seed_same_history_and_a_killed_run_resumes_to_it(reference, synth_dir, tmp_path, capsys):
    """A second run with the same seed, killed (SIGKILL, as a pre-empted job) after an epoch and
    resumed: its history.csv, rows before and after the kill, equals the reference run's. The killed
    run kept its resume.npz; the finished one removes it (no --keep-resume-state), and says so."""
    cmd = [sys.executable, "-m", "covidcxr.train", "--data", str(synth_dir), *SCRATCH, "--run-dir", "r",
           "--export-dir", "none"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    assert _wait_for_epoch(tmp_path / "r" / "state.json", proc, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((tmp_path / "r" / "state.json").read_text())["epochs_done"]
    assert 1 <= done < 3
    r = subprocess.run([sys.executable, "-m", "covidcxr.train", "--resume", "--run-dir", "r"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r" / "history.csv").read_text() == (reference / "run" / "history.csv").read_text()
    assert json.loads((tmp_path / "r" / "state.json").read_text())["finished"] is True
    assert not (tmp_path / "r" / "resume.npz").exists() and "removed" in r.stdout and "resume.npz" in r.stdout
    assert train.main(["--resume", "--run-dir", str(tmp_path / "r"), "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "has no resume.npz" in err and "--keep-resume-state" in err and len(err.strip().splitlines()) == 1


def test_resume_applies_a_longer_budget_and_refuses_other_changes(reference, tmp_path, capsys, monkeypatch):
    import shutil

    from covidcxr.training.loop import Loop

    run = tmp_path / "run"
    shutil.copytree(reference / "run", run)
    with monkeypatch.context() as m:  # Ctrl-C during an epoch: exit 130 with the real resume command
        m.setattr(Loop, "_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert train.main(["--resume", "--run-dir", str(run), "--epochs", "5", "--export-dir", "none"]) == 130
    err = capsys.readouterr().err
    assert f"python -m covidcxr.train --resume --run-dir {run}" in err and "Traceback" not in err
    assert train.main(["--resume", "--run-dir", str(run), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.1 (the run has 0.0005)" in err
    other = tmp_path / "other-data"
    other.mkdir()
    assert train.main(["--resume", "--run-dir", str(run), "--data", str(other)]) == 2
    assert f"--data {other}" in capsys.readouterr().err  # a changed --data is refused, never ignored
    assert train.main(["--resume", "--run-dir", str(run), "--epochs", "5"]) == 2  # its export exists
    assert "export directory" in capsys.readouterr().err
    assert train.main(["--resume", "--run-dir", str(run), "--epochs", "1", "--export-dir", "none"]) == 2
    assert "already ran 3 epochs" in capsys.readouterr().err
    assert train.main(["--resume", "--run-dir", str(run), "--epochs", "4", "--export-dir", "none"]) == 0
    hist = pd.read_csv(run / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2, 3]


def test_two_phase_with_local_weights_file_and_unreadable_files(synth_copy, in_tmp, capsys):
    """Head then fine-tuning from a local weights file; a file deleted after indexing is listed
    (console and skipped.csv) and left out, never fatal."""
    import keras

    from covidcxr.data.manifest import build_manifest
    from covidcxr.models.registry import build_backbone, get_spec

    df, _ = build_manifest(synth_copy, (0.7, 0.15, 0.15), progress=False)
    gone = df["path"].iloc[0]
    df.to_csv(in_tmp / "m.csv", index=False)
    Path(gone).unlink()
    bb = build_backbone(get_spec("resnet50"), 32, None)
    bb.save_weights(in_tmp / "bb.weights.h5")
    keras.backend.clear_session()
    rc = train.main(["--data", str(in_tmp / "m.csv"), "--arch", "resnet50", "--weights", str(in_tmp / "bb.weights.h5"),
                     "--epochs", "1", "--fine-tune-epochs", "1", "--unfreeze", "20", "--run-dir", "r2",
                     "--export-dir", "none", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    import re

    count = lambda l: int(re.search(r"([\d,]+) trainable", l).group(1).replace(",", ""))  # noqa: E731
    head = next(l for l in out.splitlines() if l.startswith("phase head:") and "trainable" in l)
    fine = next(l for l in out.splitlines() if l.startswith("phase finetune:") and "trainable" in l)
    assert count(fine) > count(head) and "BatchNormalization frozen" in fine
    hist = pd.read_csv(in_tmp / "r2" / "history.csv")
    assert hist["phase"].tolist() == [1, 2]
    assert hist["lr"].iloc[1] == pytest.approx(hist["lr"].iloc[0] / 10, rel=1e-3)
    assert "1 file(s) left out" in out and "file not found" in out
    assert pd.read_csv(in_tmp / "r2" / "skipped.csv")["path"].tolist() == [gone]


@pytest.mark.parametrize("args,message", [
    (["--arch", "nope"], "--arch nope: unknown architecture for --task classify"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--epochs", "0", "--fine-tune-epochs", "0"], "nothing to train"),
    (["--epochs", "-1"], "--epochs -1"),
    (["--lr", "0"], "--lr 0"),
    (["--label-fraction", "1.5"], "--label-fraction 1.5"),
    (["--split", "0.5,0.6"], "--split"),
    (["--weights", "GARBAGE"], "cannot load it into resnet50"),
])
def test_bad_starts_exit_2_and_leave_nothing(synth_dir, in_tmp, capsys, args, message):
    (in_tmp / "GARBAGE").write_bytes(b"garbage")
    assert train.main(["--data", str(synth_dir), "--arch", "resnet50", *TINY, "--run-dir", "bad", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (in_tmp / "bad").exists() and not (in_tmp / "saved_models").exists()


def test_bad_data_and_resume(in_tmp, capsys):
    assert train.main(["--data", str(in_tmp / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert train.main(["--resume", "--run-dir", "nothing-here"]) == 2
    assert "no interrupted run" in capsys.readouterr().err
    (in_tmp / "empty").mkdir()
    assert train.main(["--data", str(in_tmp / "empty"), "--run-dir", "r5", *TINY]) == 2
    assert "unknown dataset layout" in capsys.readouterr().err and not (in_tmp / "r5").exists()


def test_help_lists_flags_and_archs():
    from covidcxr.models.catalog import seg_arch_names
    from covidcxr.models.registry import arch_names

    r = subprocess.run([sys.executable, "-m", "covidcxr.train", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "400"})  # wide: no name is broken across lines
    for flag in ("--data", "--arch", "--task", "--image-size", "--batch-size", "--epochs", "--fine-tune-epochs",
                 "--unfreeze", "--lr", "--weights", "--seed", "--run-dir", "--export-dir", "--overwrite",
                 "--resume", "--cache-dir", "--no-mixed-precision", "--no-jit-compile", "--keep-resume-state"):
        assert flag in r.stdout
    arch_help = r.stdout.split("\n  --arch ARCH", 1)[1].split("\n  --task", 1)[0]
    words = set(arch_help.replace(",", " ").replace(";", " ").split())
    assert {"rad_dino", "medsiglip", "setr_rad_dino", "setr_medsiglip"} <= words
    assert set(arch_names()) <= words and set(seg_arch_names()) <= words and "..." not in arch_help
    assert "'list'" in arch_help and r.stderr == ""


def test_arch_list_prints_the_registry(capsys):
    from covidcxr.models.registry import spec_table

    assert train.main(["--arch", "list"]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name, spec in spec_table().items():
        assert spec.source in table[name] and f"multiple of {spec.size_multiple}" in table[name], name
    assert "keras.applications" in table["resnet50"] and "unet_" in table["resnet50"]
    assert "keras-hub" in table["rad_dino"] and "setr_" in table["rad_dino"] and "hf://microsoft/rad-dino" in table["rad_dino"]
    assert "segment/multitask" in table["unet"] and "classify" not in table["unet"]


@pytest.mark.parametrize("args,message", [
    (["--arch", "resnet5O"], "did you mean resnet50?"),
    (["--arch", "unet"], "--arch unet is a segmentation architecture: add --task segment"),
    (["--task", "segment", "--arch", "rad_dino"], "segmentation name such as setr_rad_dino"),
    (["--task", "segment", "--arch", "setr_nope"], "--arch setr_nope: unknown architecture for --task segment"),
    (["--image-size", "40"], "--image-size 40 does not suit resnet50"),
    (["--weights", "missing.weights.h5"], "--weights missing.weights.h5: no such file"),
    (["--preset", "resnet_50_imagenet"], "--preset: resnet50 comes from keras.applications"),
    (["--arch", "rad_dino", "--image-size", "28"], "--arch rad_dino: pass its weights with --preset"),
    (["--task", "segment", "--arch", "unet", "--weights", "imagenet"], "--weights imagenet: unet has no pretrained"),
])
def test_model_choices_are_refused_before_any_data_work(synth_dir, in_tmp, capsys, monkeypatch, args, message):
    from covidcxr.training import run

    def no_data_work(*a, **k):
        raise AssertionError("the data were read before --arch/--image-size/--weights were checked")

    monkeypatch.setattr(run, "prepare_rows", no_data_work)
    assert train.main(["--data", str(synth_dir), "--arch", "resnet50", *TINY, "--run-dir", "bad", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert "--arch list" in err or not message.startswith(("did you", "--arch setr_nope"))
    assert not (in_tmp / "bad").exists()


def test_printed_and_stored_commands_are_shell_quoted(synth_dir, tmp_path, capsys, monkeypatch):
    """Paths with spaces (COVID-QU-Ex's 'Infection Segmentation Data'): config.json's command and the
    Ctrl-C resume hint paste back into a shell as the same arguments."""
    import shlex
    import shutil

    from covidcxr.training.loop import Loop

    data = tmp_path / "Infection Segmentation Data"
    shutil.copytree(synth_dir, data)
    run_dir = tmp_path / "my runs" / "run 1"

    def one_epoch_then_ctrl_c(self, state):
        state.epochs_done = 1
        state.save(self.run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "run", one_epoch_then_ctrl_c)
    argv = ["--data", str(data), *SCRATCH, "--run-dir", str(run_dir), "--export-dir", "none"]
    assert train.main(argv) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1].split("continue with: ", 1)[1]
    assert shlex.split(hint) == ["python", "-m", "covidcxr.train", "--resume", "--run-dir", str(run_dir)]
    command = json.loads((run_dir / "config.json").read_text())["command"]
    assert shlex.split(command) == ["python", "-m", "covidcxr.train", *argv]


def test_trains_on_real_covid_qu_ex(in_tmp):
    root = shared_path("covid-qu-ex-sample")
    rc = train.main(["--data", str(root), "--arch", "resnet18", "--weights", "none", "--epochs", "1",
                     "--fine-tune-epochs", "0", "--run-dir", "real", "--export-dir", "none", *TINY])
    assert rc == 0
    m = json.loads((in_tmp / "real" / "metrics.json").read_text())
    assert m["val"]["n"] == 60 and m["test"]["n"] == 60  # the dataset's own Val and Test
    assert set(m["val"]["per_class"]) == {"COVID-19", "Non-COVID", "Normal"}


def test_segmentation_metrics_name_the_model_input_resolution(synth_dir, in_tmp, capsys):
    """The training log and metrics.json say that Dice/IoU/HD95 are scored on masks resized to the
    model's input (not at the masks' own resolution, which covidcxr.evaluate reports as well)."""
    assert train.main(["--data", str(synth_dir), "--task", "segment", "--arch", "unet", "--weights", "none",
                       "--epochs", "1", "--fine-tune-epochs", "0", "--run-dir", "seg", "--export-dir", "none",
                       *TINY]) == 0
    out = capsys.readouterr().out
    m = json.loads((in_tmp / "seg" / "metrics.json").read_text())
    for split in ("val", "test"):
        s = m[split]["segmentation"]
        assert s["scored_at"] == "model input 32x32" and s["hd95_unit"] == "px at 32x32"
        assert {"n", "dice", "iou", "hd95", "hd95_undefined"} <= set(s)
        hd = "n/a" if s["hd95"] is None else f"{s['hd95']:.2f}"
        assert (f"{split}: lung Dice {s['dice']:.4f}, IoU {s['iou']:.4f}, HD95 {hd} px at the model's 32x32 input "
                f"(n={s['n']} masks)") in out


def test_export_check_on_a_non_image_is_one_line(reference, tmp_path, capsys):
    from covidcxr import export

    note = tmp_path / "notes.png"
    note.write_text("not an image")
    assert export.main([str(reference / "run"), "--out", str(tmp_path / "e"), "--check", str(note)]) == 2
    err = capsys.readouterr().err
    assert "notes.png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()

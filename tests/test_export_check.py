"""The export check says whether pixels or numerics differ; a finished run whose export fails stays a
finished run (exit 3, the retry command); training on real films exports by default and the
SavedModel serves what `predict` computes."""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from covidcxr import export, train
from covidcxr.exporting import check as C
from covidcxr.inference import Decoded, Item, Predictor
from tests.conftest import shared_path

tf = pytest.importorskip("tensorflow")

QUICK = ["--weights", "none", "--epochs", "1", "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8"]


def test_the_check_names_pixels_or_numerics():
    ok = C.ExportCheck(4, on_same_pixels=3e-6, end_to_end=3e-6)
    assert ok.problems() == [] and "identical pixels" in ok.summary()
    pixels = C.ExportCheck(4)
    pixels.pixels.add("a.png", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    off = np.zeros((8, 8), np.uint8)
    off[0, :3] = 1
    pixels.pixels.add("b.png", np.zeros((8, 8), np.uint8), off)
    (msg,) = pixels.problems()
    assert msg.startswith("preprocessing:") and "3 pixels in 1 of 2 files" in msg and "b.png" in msg
    numerics = C.ExportCheck(4, on_same_pixels=7.3e-4)
    (msg,) = numerics.problems()
    assert msg.startswith("numerics:") and "identical input pixels" in msg and "7.30e-04" in msg
    with pytest.raises(C.ExportCheckError, match="export discarded. numerics"):
        C.require(numerics)


def _mixed_real_files() -> list[str]:
    """Real films of every mode here: 8-bit gray (299 and 256 px) and RGB PNGs."""
    cxr = shared_path("cxr-sample")
    rgb = [p for p in sorted(cxr.rglob("Viral Pneumonia/images/*.png")) if _mode(p) == "RGB"][:2]
    gray = sorted(cxr.rglob("COVID/images/*.png"))[:2]
    quex = sorted(shared_path("covid-qu-ex-sample").rglob("Test/*/images/*.png"))[:2]
    assert len(rgb) == 2
    return [str(p) for p in rgb + gray + quex]


def _mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        return img.mode


def _assert_serving_equals_predict(export_dir: Path, files: list[str]):
    items = [Item(f) for f in files]
    keras_batch = next(Predictor(export_dir, batch_size=len(items)).run(items))
    sm = Predictor(export_dir, batch_size=len(items), prefer="savedmodel")
    sm_batch = next(sm.run(items, pixels=True))
    assert len(sm_batch.done) == len(files) and not sm_batch.failed
    assert np.array_equal(sm_batch.x, keras_batch.x)           # the same pixels, every file
    for a, b in ((keras_batch.probs, sm_batch.probs), (keras_batch.masks, sm_batch.masks)):
        if a is not None:
            assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("task", ["classify", "multitask"])
def test_training_on_real_films_exports_and_serving_equals_predict(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = shared_path("covid-qu-ex-sample")
    extra = ["--arch", "mobilenetv3small"] if task == "classify" else ["--task", "multitask", "--arch", "unet"]
    rc = train.main(["--data", str(data), *extra, *QUICK, "--run-dir", "run", "--export-dir", "export"])
    assert rc == 0
    status = json.loads((tmp_path / "run" / "export_status.json").read_text())
    assert status["ok"] and (tmp_path / "export" / "serving" / "1" / "saved_model.pb").exists()
    _assert_serving_equals_predict(tmp_path / "export", _mixed_real_files())


def test_a_failed_export_after_training_is_exit_3_with_the_retry_command(synth_dir, tmp_path, monkeypatch, capsys):
    import covidcxr.exporting.savedmodel as E

    monkeypatch.chdir(tmp_path)

    def refuse(check, tolerance=C.TOLERANCE):
        raise C.ExportCheckError("exported SavedModel does not reproduce the Keras model; numerics: 1e-3")

    monkeypatch.setattr(E, "require", refuse)
    rc = train.main(["--data", str(synth_dir), "--arch", "mobilenetv3small", *QUICK,
                     "--run-dir", "my run", "--export-dir", "my export"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "EXPORT FAILED (the training run itself finished and is complete)" in err
    run = tmp_path / "my run"
    for name in ("best.keras", "metrics.json", "history.csv", "model_card.json"):
        assert (run / name).exists(), name
    status = json.loads((run / "export_status.json").read_text())
    assert status["ok"] is False and "numerics" in status["error"]
    assert not (tmp_path / "my export").exists() and not (tmp_path / "my export.partial").exists()
    retry = [line.split("retry the export with: ", 1)[1] for line in err.splitlines() if "retry the export with: " in line]
    argv = shlex.split(retry[0])
    assert argv[:3] == ["python", "-m", "covidcxr.export"] and Path(argv[3]).resolve() == run.resolve()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert export.main(argv[3:]) == 0 and (tmp_path / "my export" / "serving" / "1").exists()
    readme = (tmp_path / "my export" / "README.md").read_text()   # the export describes itself
    assert "covidcxr.load_model" in readme and "COVID, Lung_Opacity, Normal, Viral Pneumonia" in readme
    assert "identical pixels" in readme and "Not a medical device" in readme

    # One file the SavedModel cannot decode fails only itself, not its batch.
    good = [str(p) for p in sorted(Path(synth_dir).rglob("images/*.png"))[:2]]
    sm = Predictor(tmp_path / "my export", batch_size=3, prefer="savedmodel")
    done = [sm.decode(Item(p)) for p in good] + [Decoded(Item("junk.png"), raw=b"\x89PNG but not really")]
    batch = sm._run_savedmodel(done, [])
    assert [d.item.path for d in batch.done] == good and batch.probs.shape == (2, 4)
    assert [f.item.path for f in batch.failed] == ["junk.png"] and "cannot decode" in batch.failed[0].reason


def test_an_unexpected_error_in_the_export_is_a_failed_export_not_a_crash(tmp_path, monkeypatch):
    from covidcxr.errors import EXIT_EXPORT_FAILED, ExportFailedError
    from covidcxr.training import run as R

    def boom(*a, **k):
        raise TypeError("tf__mask_from_probs() missing 3 required positional arguments")

    monkeypatch.setattr(R, "export_run", boom)
    lines = []
    (tmp_path / "run dir").mkdir()
    failure = R._export(tmp_path / "run dir", tmp_path / "out", lambda *a, **k: lines.append(a[0]))
    assert isinstance(failure, ExportFailedError) and failure.exit_code == EXIT_EXPORT_FAILED == 3
    status = json.loads((tmp_path / "run dir" / "export_status.json").read_text())
    assert status["ok"] is False and status["error"].startswith("TypeError: tf__mask_from_probs")
    assert "Traceback" in status["traceback"] and shlex.split(status["retry"])[3] == str(tmp_path / "run dir")
    assert any(line.startswith("EXPORT FAILED") for line in lines)

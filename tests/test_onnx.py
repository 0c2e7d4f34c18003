"""export --format onnx: model.onnx reproduces Keras on real films (classifier trained here, U-Net segmenter,
multi-task U-Net), predict --engine onnx gives the Keras path's columns and values, and a model that fails to
convert or to match is refused with no file kept."""
import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from covidcxr import artifacts as A
from covidcxr import export, predict, train
from covidcxr.exporting import onnxfile
from covidcxr.inference import Item, ModelFile, Predictor
from covidcxr.tasks import get_task
from tests.conftest import shared_path

pytest.importorskip("tensorflow")
for _name in ("onnx", "onnxruntime", "tf2onnx"):
    if importlib.util.find_spec(_name) is None:
        pytest.skip(f"{_name} (extra [onnx]) not installed", allow_module_level=True)

QUICK = ["--weights", "none", "--epochs", "1", "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8"]


def _films(n_each: int = 3) -> list[str]:
    """Real films: COVID-QU-Ex 256 px gray and cxr-sample 299 px (gray and RGB)."""
    quex = sorted(shared_path("covid-qu-ex-sample").rglob("Test/*/images/*.png"))
    cxr = sorted(shared_path("cxr-sample").rglob("images/*.png"))
    return [str(p) for p in quex[::max(1, len(quex) // n_each)][:n_each] + cxr[::max(1, len(cxr) // n_each)][:n_each]]


def _hand_built(folder: Path, task: str) -> Path:
    """An export-like folder (model.keras + model_card.json) of a random-init U-Net for ``task``."""
    folder.mkdir(parents=True)
    classes = ["COVID-19", "Non-COVID", "Normal"] if task == "multitask" else []
    get_task(task).build("unet", 32, len(classes) or 1, None, 0.2, None).save(folder / A.EXPORT_MODEL)
    A.ModelCard(classes, "unet", task=task, image_size=32, target="lung").save(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("onnx") / "run"
    data = shared_path("covid-qu-ex-sample")
    assert train.main(["--data", str(data), "--arch", "mobilenetv3small", *QUICK, "--run-dir", str(run),
                       "--export-dir", "none"]) == 0
    return run


def _assert_onnx_equals_keras(folder: Path, files: list[str]):
    items = [Item(f) for f in files]
    ref = next(Predictor(folder, batch_size=4).run(items[:4]))       # two batch sizes: no padding needed
    onnx_pred = Predictor(folder, batch_size=5, prefer="onnx")
    assert onnx_pred.kind is ModelFile.ONNX and onnx_pred.model is None    # no Keras model loaded
    got = list(onnx_pred.run(items))
    assert sum(len(b.done) for b in got) == len(files) and not any(b.failed for b in got)
    full = next(Predictor(folder, batch_size=len(items)).run(items))
    assert np.array_equal(np.concatenate([b.x for b in got]), full.x)           # the same host pixels
    assert np.array_equal(ref.x, full.x[:4])
    for name in ("probs", "masks"):
        a, b = getattr(full, name), [getattr(g, name) for g in got]
        if a is not None:
            assert np.abs(a - np.concatenate(b)).max() <= 1e-4, name


def test_a_trained_classifier_exports_to_onnx_checked_and_predict_engine_onnx_matches(classifier_run, tmp_path,
                                                                                    capsys):
    out = tmp_path / "export"
    assert export.main([str(classifier_run), "--out", str(out), "--format", "onnx"]) == 0
    assert (out / A.ONNX_MODEL).exists() and (out / A.CARD).exists() and not (out / "serving").exists()
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "ONNX Runtime checked on" in readme and "--engine onnx" in readme
    files = _films()
    _assert_onnx_equals_keras(out, files)
    args = [*files, "--quiet", "--batch-size", "4"]
    assert predict.main(["--model", str(out), *args, "--engine", "onnx", "--out", str(tmp_path / "o.csv")]) == 0
    assert predict.main(["--model", str(out), *args, "--out", str(tmp_path / "k.csv")]) == 0
    with open(tmp_path / "o.csv") as f1, open(tmp_path / "k.csv") as f2:
        o, k = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert list(o[0]) == list(k[0]) and [r["path"] for r in o] == [r["path"] for r in k]
    probs = [c for c in o[0] if c.startswith("prob_")]
    assert np.abs(np.array([[float(r[c]) for c in probs] for r in o])
                  - np.array([[float(r[c]) for c in probs] for r in k])).max() <= 1e-4
    assert [r["label"] for r in o] == [r["label"] for r in k]

    # an export without model.onnx: --engine onnx says how to make one (exit 2)
    capsys.readouterr()
    (out / A.ONNX_MODEL).unlink()
    assert predict.main(["--model", str(out), *args, "--engine", "onnx", "--out", str(tmp_path / "x.csv")]) == 2
    assert "--format savedmodel,onnx" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["segment", "multitask"])
def test_unet_segmenter_and_multitask_onnx_equal_keras_on_real_films(task, tmp_path):
    src = _hand_built(tmp_path / "src", task)
    files = _films()
    checks = [a for f in files[:3] for a in ("--check", f)]
    formats = "savedmodel,onnx" if task == "multitask" else "onnx"
    assert export.main([str(src), "--out", str(tmp_path / "export"), "--format", formats, *checks]) == 0
    out = tmp_path / "export"
    assert (out / A.ONNX_MODEL).exists() and ((out / "serving").exists() == (task == "multitask"))
    _assert_onnx_equals_keras(out, files)
    masks = tmp_path / "masks"
    assert predict.main(["--model", str(out), *files, "--engine", "onnx", "--quiet", "--masks", str(masks),
                         "--out", str(tmp_path / "o.csv")]) == 0
    assert len(list(masks.glob("*.png"))) == len(files)


def test_a_model_that_fails_to_convert_or_to_match_is_refused_and_nothing_is_kept(tmp_path, monkeypatch, capsys):
    src = _hand_built(tmp_path / "src", "segment")
    films = [a for f in _films(1) for a in ("--check", f)]
    import keras

    def no_convert(self, *a, **k):
        raise NotImplementedError("Unsupported ops: Foo")

    monkeypatch.setattr(keras.Model, "export", no_convert)
    assert export.main([str(src), "--out", str(tmp_path / "e1"), "--format", "onnx", *films]) == 2
    err = capsys.readouterr().err
    assert "unet does not convert to ONNX (NotImplementedError: Unsupported ops: Foo)" in err
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e1.partial").exists()
    monkeypatch.undo()

    real = onnxfile.onnx_outputs
    monkeypatch.setattr(onnxfile, "onnx_outputs", lambda s, x: real(s, x) + 1e-3)   # numerics off by 1e-3
    assert export.main([str(src), "--out", str(tmp_path / "e2"), "--format", "onnx", *films]) != 0
    err = capsys.readouterr().err
    assert "model.onnx does not reproduce the Keras model" in err and "numerics" in err and "1.00e-03" in err
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e2.partial").exists()
    assert export.main([str(src), "--out", str(tmp_path / "e3"), "--format", "tflite"]) == 2

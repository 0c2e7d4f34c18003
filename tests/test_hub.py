"""hf://OWNER/NAME[@REV] resolves from a Hugging Face cache laid out as huggingface_hub lays it out, with the
network off; a missing repo is one clear line; --push-to-hub calls create_repo + upload_folder (recorded here,
never sent); the export README is a Hugging Face model card."""
import csv
import hashlib
import os
import socket
from pathlib import Path

import pytest

from covidcxr import artifacts as A
from covidcxr import export, hub, predict
from covidcxr.errors import ConfigError, DataError
from covidcxr.exporting.readme import hub_readme
from covidcxr.tasks import get_task

hf = pytest.importorskip("huggingface_hub", reason="huggingface_hub (extra [hub]) not installed")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny export folder (model.keras + model_card.json), random weights: what a Hub repo of covidcxr holds."""
    folder = tmp_path_factory.mktemp("export") / "tiny"
    folder.mkdir()
    model = get_task("classify").build("mobilenetv3small", 32, len(CLASSES), None, 0.2, None)
    model.save(folder / A.EXPORT_MODEL)
    A.ModelCard(CLASSES, "mobilenetv3small", image_size=32, normalization="unit").save(folder)
    (folder / "README.md").write_text("---\nlibrary_name: keras\n---\n# tiny\n")
    return folder


def _lay_out_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """models--OWNER--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, export_dir):
    cache = tmp_path / "hf-home" / "hub"
    snap = _lay_out_cache(cache, "covidcxr-test/tiny-cxr", export_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return snap


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_handles_parse_and_bad_ones_are_refused():
    assert hub.parse("hf://me/cxr-model") == hub.HubHandle("me/cxr-model")
    assert hub.parse("hf://me/cxr-model@v1.0").revision == "v1.0"
    assert str(hub.parse("me/m@abc")) == "hf://me/m@abc"
    for bad in ("hf://nohandle", "hf://a/b/c", "hf://me/m@", "hf:///m"):
        with pytest.raises(ConfigError, match="hf://OWNER/NAME"):
            hub.parse(bad)


def test_hf_model_resolves_offline_from_the_cache_and_predicts_like_the_folder(offline_cache, export_dir, tmp_path,
                                                                               capsys):
    assert A.locate("hf://covidcxr-test/tiny-cxr").root == offline_cache        # refs/main -> snapshot
    assert A.locate(f"hf://covidcxr-test/tiny-cxr@{COMMIT}").root == offline_cache
    films = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-sample").rglob("*.png"))[:3]
    if not films:
        pytest.skip("../shared/data/cxr-sample not present (runs in CI)")
    args = [*map(str, films), "--quiet", "--batch-size", "2"]
    assert predict.main(["--model", "hf://covidcxr-test/tiny-cxr", *args, "--out", str(tmp_path / "hub.csv")]) == 0
    assert predict.main(["--model", str(export_dir), *args, "--out", str(tmp_path / "local.csv")]) == 0
    hub_rows, local_rows = _rows(tmp_path / "hub.csv"), _rows(tmp_path / "local.csv")
    assert [r["path"] for r in hub_rows] == [str(f) for f in films] and hub_rows == local_rows


def test_a_missing_repo_or_revision_is_one_clear_line(offline_cache, tmp_path, capsys):
    rc = predict.main(["--model", "hf://nobody/missing", "x.png", "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "hf://nobody/missing" in err[0] and "HF_HUB_OFFLINE=1" in err[0] and "Traceback" not in err[0]
    with pytest.raises(DataError, match="not in the Hugging Face cache"):
        A.locate("hf://covidcxr-test/tiny-cxr@no-such-branch")


class _Recorder:
    """Stands in for huggingface_hub.HfApi: records the calls (and the files the upload would send)."""

    calls: list = []

    def __init__(self, *a, **k):
        pass

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kw):
        files = sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files}))
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{kw['repo_id']}/commit/1"})()


def test_push_to_hub_creates_the_repo_and_uploads_the_export_folder(export_dir, tmp_path, monkeypatch, capsys):
    _Recorder.calls = []
    monkeypatch.setattr(hf, "HfApi", _Recorder)
    monkeypatch.setattr(export, "export_run", lambda *a, **k: export_dir)   # the export itself: test_export_check
    assert export.main([str(export_dir), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny-cxr"]) == 0
    (c_name, c_repo, c_kw), (u_name, u_repo, u_kw) = _Recorder.calls
    assert (c_name, c_repo, c_kw["exist_ok"], c_kw["repo_type"]) == ("create_repo", "me/tiny-cxr", True, "model")
    assert (u_name, u_repo, Path(u_kw["folder_path"])) == ("upload_folder", "me/tiny-cxr", export_dir)
    assert {"model.keras", "model_card.json", "README.md"} <= set(u_kw["files"])
    assert "pushed" in capsys.readouterr().out

    def refuse(self, **kw):
        raise RuntimeError("401 Unauthorized: invalid token")

    monkeypatch.setattr(_Recorder, "upload_folder", refuse)
    rc = export.main([str(export_dir), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny-cxr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "401 Unauthorized" in err[0] and "export itself is kept" in err[0]
    assert export.main([str(export_dir), "--out", str(tmp_path / "o2"), "--push-to-hub", "not-a-repo"]) == 2


def test_the_export_readme_is_a_hugging_face_card(tmp_path):
    card = A.ModelCard(CLASSES, "resnet50", image_size=224)
    folder, source = tmp_path / "export", tmp_path / "run"
    folder.mkdir(), source.mkdir()
    (source / A.METRICS).write_text('{"accuracy": 0.875, "macro_f1": 0.8, "per_class": {"COVID": 1}}')
    fallback = hub_readme(folder, source, card, "checked on 3 images")          # no MODEL_CARD.md: from the files
    head = fallback.split("---\n")[1]
    assert fallback.startswith("---\n") and "library_name: keras" in head and "pipeline_tag: image-classification" in head
    assert "| accuracy | 0.875 |" in fallback and "covidcxr.load_model" in fallback and "Not a medical device" in fallback
    (folder / "MODEL_CARD.md").write_text("---\nlibrary_name: keras\nlicense: other\n---\n# the card\n\n## Model\n")
    (folder / A.ONNX_MODEL).write_bytes(b"")
    readme = hub_readme(folder, source, card, "checked on 3 images")
    assert readme.startswith("---\nlibrary_name: keras\nlicense: other\n---\n# the card")
    assert "\n## resnet50 (classify) exported by covidcxr" in readme and "\n### Files" in readme
    assert "--engine onnx" in readme and "serving/1/" not in readme and readme.count("---\n") >= 2


def _backbone(model):
    return [w for layer in model.layers if layer.name == "backbone" for w in layer.get_weights()]


def test_train_weights_hf_starts_from_the_hub_model(offline_cache, export_dir, synth_dir, tmp_path, capsys):
    """train --weights hf://OWNER/NAME (an export in the cache, network off): the backbone is the export's, and
    stays so through a frozen-encoder epoch; the same classes keep the export's head too."""
    import numpy as np

    from covidcxr import train
    from covidcxr.inference import load_keras

    run = tmp_path / "run"
    assert train.main(["--data", str(synth_dir), "--arch", "mobilenetv3small", "--weights", "hf://covidcxr-test/tiny-cxr",
                       "--epochs", "1", "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "8",
                       "--run-dir", str(run), "--export-dir", "none"]) == 0
    out = capsys.readouterr().out
    assert "--weights hf://covidcxr-test/tiny-cxr (mobilenetv3small classify model" in out and "layers copied" in out
    assert "kept their initialisation" not in out                    # same classes: every layer, the head too
    src, got = _backbone(load_keras(export_dir / A.EXPORT_MODEL)), _backbone(load_keras(run / A.BEST))
    assert len(src) == len(got) > 10 and all(np.array_equal(a, b) for a, b in zip(src, got))


def test_train_weights_model_folder_keeps_a_new_head_and_refuses_another_arch(export_dir, tmp_path):
    import numpy as np

    from covidcxr.config import TrainConfig
    from covidcxr.inference import load_keras
    from covidcxr.training.network import build_network, check_model

    said = []
    cfg = TrainConfig(arch="mobilenetv3small", image_size=64, weights=str(export_dir))
    net, weights = build_network(cfg, get_task("classify"), 3, said.append)
    assert weights == str(export_dir) and "kept their initialisation (label" in said[0]
    src = load_keras(export_dir / A.EXPORT_MODEL)
    assert all(np.array_equal(a, b) for a, b in zip(_backbone(src), _backbone(net)))   # at another image size
    with pytest.raises(ConfigError, match="is a mobilenetv3small classify model; start from it with --arch mobilenetv3small"):
        check_model(TrainConfig(arch="resnet18", image_size=32, weights=str(export_dir)), get_task("classify"))
    with pytest.raises(ConfigError, match="--task classify"):
        check_model(TrainConfig(task="multitask", arch="unet_mobilenetv3small", image_size=32, weights=str(export_dir)),
                    get_task("multitask"))

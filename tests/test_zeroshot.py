"""python -m covidcxr.zeroshot end to end: CLIP and MedSigLIP zero-shot classification, MedSigLIP + SAM
text-prompted segmentation, and the inputs it refuses. Tiny random models (32-64 px), synthetic data."""
import json
import re
import string

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import zeroshot
from tests.tiny_foundation import tiny_clip, tiny_sam, tiny_siglip

ODD = ("Normal", "Normal-1.png")  # resized to 80x56, its lung mask to 40x28: masks at each file's own size


def _siglip_preset(path):
    """Tiny SigLIP (both towers, 32 px, patch 16) with a SentencePiece tokenizer trained here; scale 10, bias -2."""
    backbone, tok = tiny_siglip()
    backbone.siglip_head.logit_scale.assign(np.log(10.0))
    backbone.siglip_head.logit_bias.assign(-2.0)
    backbone.save_to_preset(str(path))
    tok.save_to_preset(str(path))
    return path


def _clip_preset(path):
    """Tiny CLIP (both towers, 32 px) with a character-level BPE tokenizer."""
    import keras_hub

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "-,.()'":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["ab"], vocab["ab</w>"] = len(vocab), len(vocab) + 1
    tok = keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=["a b"])
    tiny_clip(len(vocab), 24).save_to_preset(str(path))
    tok.save_to_preset(str(path))
    return path


def _sam_preset(path, size=64):
    tiny_sam(size).save_to_preset(str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs_presets")
    return {"clip": str(_clip_preset(root / "clip")), "siglip": str(_siglip_preset(root / "siglip")),
            "sam": str(_sam_preset(root / "sam"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic Kaggle-layout folder (4 classes x 3, 64 px, lung masks), one image and mask at other sizes,
    and one unreadable file."""
    from covidcxr.data.synth import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path_factory.mktemp("zs_data") / "data", per_class=3, size=64, seed=5,
                                   progress=False)
    cls, name = ODD
    for sub, size in (("images", (80, 56)), ("masks", (40, 28))):
        p = root / cls / sub / name
        Image.open(p).resize(size, Image.NEAREST if sub == "masks" else Image.BILINEAR).save(p)
    (root / "COVID" / "images" / "broken.png").write_bytes(b"not a png at all")
    return root


def _run(*args) -> int:
    return zeroshot.main([str(a) for a in args] + ["--quiet"])


def _agrees_with_sklearn(m: dict, pred: pd.DataFrame) -> np.ndarray:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    classes = m["classes"]
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (pred["pred_label"] == [classes[i] for i in probs.argmax(axis=1)]).all()
    assert m["accuracy"] == accuracy_score(pred["true_label"], pred["pred_label"])
    assert abs(m["macro_f1"] - f1_score(pred["true_label"], pred["pred_label"], average="macro")) < 1e-12
    assert np.array_equal(m["confusion_matrix"], confusion_matrix(pred["true_label"], pred["pred_label"],
                                                                  labels=classes))
    aucs = [roc_auc_score(pred["true_label"] == c, probs[:, i]) for i, c in enumerate(classes)]
    assert abs(m["macro_auc"] - np.mean(aucs)) < 1e-12
    return probs


def _nothing_written(out) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_clip_zero_shot_end_to_end_with_the_old_command_line(models, data, tmp_path, capsys):
    out = tmp_path / "clip"
    assert _run("--preset", models["clip"], "--data", data, "--out", out, "--bootstrap", 20) == 0
    console = capsys.readouterr().out
    m, pred = json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "predictions.csv")
    assert m["model_kind"] == "zero-shot CLIP" and m["split"] == "all" and m["n"] == len(pred) == 12
    assert len(m["prompts"]) == 4 and m["scoring"]["logit_scale"] == 100.0
    _agrees_with_sklearn(m, pred)
    assert not [c for c in pred if c.startswith("score_")]  # CLIP has no independent scores
    for f in ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "examples.png", "report.html"):
        assert (out / f).exists(), f
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["path"].str.endswith("broken.png").tolist() == [True] and m["skipped"][0][0].endswith("broken.png")
    assert "1 file(s) left out" in console and "broken.png" in console
    assert not (tmp_path / "clip.partial").exists()
    assert _run("--preset", models["clip"], "--data", data, "--out", out) == 2  # never overwritten unasked
    assert "already exists" in capsys.readouterr().err


def test_medsiglip_zero_shot_sigmoid_scores_on_a_manifest(models, data, tmp_path, capsys):
    from covidcxr.data.manifest import build_manifest

    df, _ = build_manifest(data, (0.7, 0.15, 0.15), progress=False)
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "path": str(tmp_path / "gone.png"), "sha256": "x"}  # vanished file
    df.to_csv(tmp_path / "manifest.csv", index=False)
    classes = sorted(df["label"].unique())
    (tmp_path / "p.yaml").write_text("".join(f"{c}:\n  - a chest x-ray showing {c.lower()}\n" for c in classes))
    out = tmp_path / "siglip"
    assert _run("--model", "medsiglip", "--preset", models["siglip"], "--data", tmp_path / "manifest.csv",
                "--split", "all", "--prompts", tmp_path / "p.yaml", "--out", out, "--bootstrap", 20) == 0
    m, pred = json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "predictions.csv")
    assert m["n"] == len(pred) == 12 and m["prompts"] == {c: [f"a chest x-ray showing {c.lower()}"] for c in classes}
    probs = _agrees_with_sklearn(m, pred)
    scores = pred[[f"score_{c}" for c in classes]].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(probs, scores / scores.sum(axis=1, keepdims=True), rtol=1e-9)
    assert abs(m["scoring"]["logit_scale"] - 10.0) < 1e-4 and abs(m["scoring"]["logit_bias"] + 2.0) < 1e-6
    assert pd.read_csv(out / "skipped.csv")["path"].tolist() == [str(tmp_path / "gone.png")]
    assert "report.html" in capsys.readouterr().out


def test_text_prompted_segmentation_end_to_end(models, data, tmp_path, capsys):
    from covidcxr.data.imageio import read_mask
    from covidcxr.evaluation.figures import segmentation

    out = tmp_path / "seg"
    assert _run("--task", "segment", "--model", "medsiglip", "--preset", models["siglip"], "--sam", models["sam"],
                "--prompt", "lungs", "--data", data, "--out", out, "--bootstrap", 20) == 0
    m, pred = json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "predictions.csv")
    seg = m["segmentation"]
    assert m["task"] == "segment" and m["n"] == len(pred) == 12 and seg["target"] == "lung" and seg["n"] == 12
    for f in ("segmentation.png", "report.html", "skipped.csv"):
        assert (out / f).exists(), f
    same = []
    for _, r in pred.iterrows():
        mask = np.asarray(Image.open(out / r["mask"]))
        assert mask.shape == np.asarray(Image.open(r["path"])).shape == (r["height"], r["width"])  # own size
        assert set(np.unique(mask)) <= {0, 255} and r["mask"].startswith(f"masks/{r['label']}/")
        truth = read_mask(r["path"].replace("/images/", "/masks/"))
        if truth.shape == mask.shape:
            same.append((truth, mask > 0, r))
    assert len(same) == 11 and (pred["height"] == 56).sum() == 1  # the odd one is scored at its truth's 40x28
    ref = segmentation([t for t, _, _ in same], [p for _, p, _ in same], [r["label"] for *_, r in same])
    np.testing.assert_allclose(ref["per_image"]["dice"], [r["dice"] for *_, r in same], atol=1e-12)
    np.testing.assert_allclose(ref["per_image"]["iou"], [r["iou"] for *_, r in same], atol=1e-12)
    assert abs(seg["dice"] - pred["dice"].mean()) < 1e-12 and abs(seg["iou"] - pred["iou"].mean()) < 1e-12
    assert set(seg["per_class"]) == set(m["classes"]) and seg["ci95"]["dice"]["n"] == 20

    # --prompt-file overrides a prompt set; 'opacity' is scored against infection masks, which this data lacks
    (tmp_path / "sets.json").write_text(json.dumps({"opacity": ["a hazy patch in the lung"]}))
    out2 = tmp_path / "seg2"
    assert _run("--task", "segment", "--preset", models["siglip"], "--sam", models["sam"],  # --model: medsiglip
                "--prompt", "opacity", "--prompt-file", tmp_path / "sets.json", "--data", data, "--out", out2,
                "--overlays", 2) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["prompt"] == {"text": "opacity", "phrasings": ["a hazy patch in the lung"], "target": "infection"}
    assert m2["segmentation"]["n"] == 0 and "infection" in m2["segmentation"]["note"]
    assert len(list((out2 / "masks").rglob("*.png"))) == 12 and "not scored" in capsys.readouterr().out


def test_streaming_segmentation_summary_equals_figures_segmentation():
    from covidcxr.evaluation.figures import segmentation
    from covidcxr.vlm.outputs import SegScores, seg_target

    rng = np.random.default_rng(0)
    truths = [rng.random((s, s + 3)) > 0.5 for s in (8, 9, 10, 11, 12)] + [np.zeros((6, 6), bool)]
    preds = [rng.random(t.shape) > 0.4 for t in truths[:-1]] + [np.ones((6, 6), bool)]  # last: HD95 undefined
    labels = ["a", "b", "a", "b", "a", "b"]
    scores = SegScores()
    for t, p, lab in zip(truths, preds, labels):
        scores.add(t.astype(np.uint8), p, lab)
    ref, got = segmentation(truths, preds, labels, bootstrap=50, seed=3), scores.summary(50, 3)
    ref.pop("per_image")
    assert got == ref
    assert seg_target("lungs", []) == "lung" and seg_target("opacity", []) == "infection"
    assert seg_target("the left lung", ["the left lung"]) == "lung"
    assert seg_target("ground-glass in the lung", ["ground-glass in the lung"]) == "infection"
    assert seg_target("the heart", ["the heart"]) is None and seg_target("the heart", [], "lung") == "lung"
    assert seg_target("lungs", [], "none") is None


def test_bad_input_is_refused_and_nothing_is_written(models, data, tmp_path, capsys):
    out = tmp_path / "z"
    seg = ["--task", "segment", "--sam", models["sam"], "--data", data, "--out", out]
    (tmp_path / "p.json").write_text(json.dumps({"COVID": ["a"], "Martian": ["b"]}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    pd.DataFrame({"path": [str(tmp_path / "nope.png")], "label": ["COVID"], "split": ["test"]}) \
        .to_csv(tmp_path / "empty.csv", index=False)
    cases = [
        (["--model", "clip", "--preset", models["siglip"], "--data", data], "SigLIPBackbone.*--model clip needs a "
                                                                            "CLIPBackbone.*--model medsiglip"),
        (["--model", "medsiglip", "--preset", models["clip"], "--data", data], "CLIPBackbone.*--model medsiglip "
                                                                               "needs a SigLIPBackbone.*--model clip"),
        (["--preset", models["clip"], "--data", data, "--prompts", tmp_path / "p.json"], "Martian"),
        (seg + ["--model", "clip", "--preset", models["clip"], "--prompt", "lungs"], "classification-only"),
        (["--preset", models["siglip"], "--model", "medsiglip", "--data", data, "--prompt", "lungs"], "--task segment"),
        (seg + ["--model", "medsiglip", "--preset", models["siglip"], "--prompt", "lungs", "--prompts",
                tmp_path / "p.json"], "--prompts do.es. not apply"),
        (["--model", "medsiglip", "--preset", models["siglip"], "--data", data, "--logit-scale", "50"], "own learned"),
        (seg[:3] + [models["siglip"]] + seg[4:] + ["--model", "medsiglip", "--preset", models["siglip"],
                                                   "--prompt", "lungs"], "--sam .* holds a SigLIPBackbone"),
        (["--preset", tmp_path / "half", "--data", data], "tokenizer.json"),
        (["--preset", "no_such_clip_preset", "--data", data], "not a keras-hub preset name"),
        (["--preset", models["clip"], "--data", tmp_path / "empty.csv", "--split", "all"], "none of the 1 images"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = args + ["--out", out]
        assert _run(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), (message, err)
        assert _nothing_written(out), args

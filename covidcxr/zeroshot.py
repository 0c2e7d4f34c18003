"""Zero-shot CLIP classification: ``python -m covidcxr.zeroshot --preset PATH_OR_NAME --data DIR``.

Classifies with text prompts only: each class gets a list of prompts (defaults below for
the Kaggle and COVID-QU-Ex class names, or ``--prompts FILE`` with ``{"class": ["prompt", ...]}``
in JSON or YAML); the prompt embeddings of a class are L2-normalised and averaged (prompt
ensembling), the image embedding is compared with each class embedding by cosine similarity,
and ``softmax(logit_scale * cosine)`` gives the probabilities. Writes the same
``metrics.json``, ``predictions.csv``, plots and ``report.html`` as ``covidcxr.evaluate``.

A general-domain CLIP knows little radiology: expect figures near chance unless the preset
is a medical CLIP. ``--preset`` takes a keras-hub CLIP preset name (downloaded) or a local
preset folder holding the CLIP backbone *and* its tokenizer (``save_to_preset`` of both).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from covidcxr.errors import ConfigError, CovidCXRError, DataError, RunExistsError

TEMPLATES = ("a chest x-ray showing {}.", "a frontal chest radiograph with {}.", "an x-ray image of the chest with {}.")
FINDINGS = {
    "covid": ["covid-19 pneumonia", "bilateral peripheral ground-glass opacities", "viral pneumonia from sars-cov-2"],
    "lung_opacity": ["a lung opacity", "focal consolidation in the lung", "an airspace opacity"],
    "normal": ["no abnormality", "clear lungs", "a normal chest"],
    "viral pneumonia": ["viral pneumonia", "diffuse interstitial opacities", "bilateral interstitial pneumonia"],
    "non-covid": ["pneumonia that is not covid-19", "a lung infection other than covid-19", "a lung disease"],
}


def default_prompts(classes: list[str]) -> dict[str, list[str]]:
    """Prompts per class: CXR findings for the known class names, the class name otherwise."""
    out = {}
    for c in classes:
        key = c.lower().replace("_", " ").replace("covid-19", "covid").strip()
        key = {"lung opacity": "lung_opacity", "non covid": "non-covid"}.get(key, key)
        findings = FINDINGS.get(key, [c.replace("_", " ").lower()])
        out[c] = [t.format(f) for f in findings for t in TEMPLATES]
    return out


def read_prompts(path: str | Path, classes: list[str]) -> dict[str, list[str]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"--prompts {path}: no such file.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:
        raise DataError(f"--prompts {path}: cannot parse it ({exc}).") from exc
    if not isinstance(doc, dict) or not all(isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                                            for v in doc.values()):
        raise DataError(f"--prompts {path}: expected {{\"class\": [\"prompt\", ...]}} with a non-empty list per class.")
    extra = sorted(set(doc) - set(classes))
    if extra:
        raise DataError(f"--prompts {path}: class(es) {extra} are not in the data (classes: {classes}).")
    missing = [c for c in classes if c not in doc]
    if missing:
        raise DataError(f"--prompts {path}: no prompts for class(es) {missing}.")
    return {c: list(doc[c]) for c in classes}


def load_clip(preset: str):
    """(CLIPBackbone, CLIPTokenizer) from a preset name or a local preset folder."""
    import keras_hub

    if Path(preset).is_dir():
        missing = [f for f in ("config.json", "tokenizer.json") if not (Path(preset) / f).exists()]
        if missing:
            raise ConfigError(f"--preset {preset}: lacks {', '.join(missing)}; a zero-shot preset needs the CLIP "
                              f"backbone and its tokenizer (save_to_preset of both).")
    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
        tokenizer = keras_hub.models.CLIPTokenizer.from_preset(preset)
    except Exception as exc:
        raise ConfigError(f"--preset {preset}: cannot load a CLIP model and tokenizer from it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Offline, pass a local preset "
                          f"folder.") from exc
    if type(backbone).__name__ != "CLIPBackbone":
        raise ConfigError(f"--preset {preset}: holds a {type(backbone).__name__}, not a CLIP model.")
    return backbone, tokenizer


def text_embeddings(backbone, tokenizer, prompts: dict[str, list[str]]) -> np.ndarray:
    """Prompt-ensembled, L2-normalised class embeddings [K, D] (order of ``prompts``)."""
    length = int(backbone.text_encoder.max_sequence_length)
    start, end = tokenizer.start_token_id, tokenizer.end_token_id
    rows = []
    for texts in prompts.values():
        ids = np.full((len(texts), length), end, np.int32)
        for i, t in enumerate(texts):
            toks = [start] + list(np.asarray(tokenizer(t)).tolist())[: length - 2] + [end]
            ids[i, : len(toks)] = toks
        emb = np.asarray(backbone.get_text_embeddings(ids), np.float64)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        mean = emb.mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def image_size_of(backbone) -> int:
    return int(backbone.vision_encoder.image_shape[0])


def image_embeddings(backbone, df, batch_size: int = 16):
    """(rows kept, L2-normalised image embeddings [n, D], skipped)."""
    import tensorflow as tf

    from covidcxr.data import preprocess as P
    from covidcxr.data.pipeline import load_examples

    size = image_size_of(backbone)
    ds = load_examples(df, sorted(set(df["label"])), size).map(
        lambda e: (P.normalize(tf.cast(e["image"], tf.float32) / 255.0, "clip"), e["path"])).batch(batch_size)
    embs, paths = [], []
    for x, p in ds:
        embs.append(np.asarray(backbone.get_vision_embeddings(x), np.float64))
        paths += [v.decode() for v in p.numpy()]
    emb = np.concatenate(embs) if embs else np.zeros((0, 1))
    emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    pos = {p: i for i, p in enumerate(df["path"])}
    kept = df.iloc[[pos[p] for p in paths]].reset_index(drop=True)
    skipped = [f"{p}: unreadable image; left out" for p in sorted(set(df["path"]) - set(paths))]
    return kept, emb, skipped


def zero_shot_probs(img: np.ndarray, txt: np.ndarray, logit_scale: float) -> np.ndarray:
    logits = logit_scale * img @ txt.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def run(preset: str, data: str, split: str = "auto", out: str | None = None, prompts_file: str | None = None,
        logit_scale: float = 100.0, bootstrap: int = 1000, seed: int = 0, overwrite: bool = False) -> Path:
    import pandas as pd

    from covidcxr.evaluate import _json_default, choose_split, data_summary, figures, load_data, write_report
    from covidcxr.plots import plot_confusion, plot_pr, plot_reliability, plot_roc

    t0 = time.perf_counter()
    df_all, desc, has_split = load_data(data)
    df, split = choose_split(df_all, split, has_split)
    classes = sorted(df_all["label"].unique())
    prompts = read_prompts(prompts_file, classes) if prompts_file else default_prompts(classes)
    out = Path(out) if out else Path("experiments") / "zeroshot" / f"{Path(str(preset).rstrip('/')).name}-{split}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite or another --out.")
    backbone, tokenizer = load_clip(preset)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        txt = text_embeddings(backbone, tokenizer, prompts)
        kept, img, skipped = image_embeddings(backbone, df)
        if not len(kept):
            raise DataError(f"none of the {len(df)} images could be read.")
        probs = zero_shot_probs(img, txt, logit_scale)
        look = {c: i for i, c in enumerate(classes)}
        y = np.array([look[c] for c in kept["label"]])
        m = {"schema": "covidcxr.evaluate/1", "model": str(preset), "model_kind": "zero-shot CLIP",
             "task": "classify", "data": str(data), "split": split, "classes": classes}
        m.update(figures(y, probs, classes, bootstrap, seed))
        m.update(skipped=skipped, warnings=[], prompts=prompts, logit_scale=logit_scale,
                 calibration={"ece_before": m["ece"], "ece_after": None, "temperature": None,
                              "note": "zero-shot: no temperature fitted"},
                 tta=None, mask_lungs=None, gradcam=None, bootstrap={"replicates": bootstrap, "seed": seed},
                 data_summary=data_summary(df_all, df, has_split, skipped),
                 model_config={"preset": str(preset), "image_size": image_size_of(backbone),
                               "normalization": "clip", "prompt_ensembling": "mean of L2-normalised embeddings"})
        pred = pd.DataFrame({"path": kept["path"], "true_label": kept["label"],
                             "pred_label": [classes[i] for i in probs.argmax(axis=1)]})
        for i, c in enumerate(classes):
            pred[f"prob_{c}"] = probs[:, i]
        pred.to_csv(tmp / "predictions.csv", index=False, float_format="%.17g")
        plot_confusion(m["confusion_matrix"], classes, tmp / "confusion_matrix.png", f"zero-shot, {split}, n={m['n']}")
        plot_roc(y, probs, classes, tmp / "roc.png")
        plot_pr(y, probs, classes, tmp / "pr.png")
        plot_reliability(m["reliability"], None, m["ece"], None, None, tmp / "reliability.png")
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2, default=_json_default))
        write_report(tmp, m)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    auc = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
    print(f"zero-shot on {m['n']} images of split '{split}' from {desc}: accuracy {m['accuracy']:.4f}, "
          f"macro-F1 {m['macro_f1']:.4f}, macro-AUC {auc}; written to {out} ({time.perf_counter() - t0:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m covidcxr.zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="keras-hub CLIP preset name or local preset folder")
    p.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    p.add_argument("--split", default="auto", choices=["auto", "train", "val", "test", "all"])
    p.add_argument("--prompts", default=None, help="JSON/YAML file: {class: [prompt, ...]} (default: built-in)")
    p.add_argument("--logit-scale", type=float, default=100.0, help="inverse temperature of the softmax (CLIP: 100)")
    p.add_argument("--out", default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.logit_scale <= 0:
            raise ConfigError("--logit-scale must be positive.")
        run(a.preset, a.data, a.split, a.out, a.prompts, a.logit_scale, a.bootstrap, a.seed, a.overwrite)
    except CovidCXRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

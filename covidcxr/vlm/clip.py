"""Zero-shot classification with a CLIP model, and the default chest-X-ray prompt ensembles.

CLIP is trained with a *softmax* (contrastive) loss over a batch: the class probabilities of
an image are ``softmax(logit_scale * cos(image, class))``, which sum to 1 by construction.
Prompt ensembles as in CLIP's paper: each prompt is embedded and L2-normalised, the prompts
of a class are averaged and the mean renormalised. Text is tokenised, opened with the start
token, closed with the end token and padded with the end token to the text tower's length
(CLIP's text pooler reads the position of the highest token id, the end token).

A general-domain CLIP knows little radiology: expect figures near chance unless the preset is
a medical CLIP. ``load_clip`` accepts a keras-hub CLIP preset name or a local folder holding
the CLIP backbone *and* its tokenizer (``save_to_preset`` of both).

``default_prompts`` (also used for SigLIP, via ``siglip.cxr_prompts``) gives per-class
findings for the Kaggle (COVID, Lung_Opacity, Normal, Viral Pneumonia) and COVID-QU-Ex
(COVID-19, Non-COVID, Normal) class names, in three sentence templates.
"""
from __future__ import annotations

import os

import numpy as np
from keras import ops

from covidcxr.errors import ConfigError
from covidcxr.models.layers import BackboneInput
from covidcxr.models.presets import load_with_tokenizer

TEMPLATES = ("a chest x-ray showing {}.", "a frontal chest radiograph with {}.", "an x-ray image of the chest with {}.")
FINDINGS = {
    "covid": ["covid-19 pneumonia", "bilateral peripheral ground-glass opacities", "viral pneumonia from sars-cov-2"],
    "lung_opacity": ["a lung opacity", "focal consolidation in the lung", "an airspace opacity"],
    "normal": ["no abnormality", "clear lungs", "a normal chest"],
    "viral pneumonia": ["viral pneumonia", "diffuse interstitial opacities", "bilateral interstitial pneumonia"],
    "non-covid": ["pneumonia that is not covid-19", "a lung infection other than covid-19", "a lung disease"],
}
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's learned inverse temperature converges to (and is clipped at) 100


def default_prompts(classes: list[str]) -> dict[str, list[str]]:
    """Prompts per class: CXR findings for the known class names, the class name otherwise."""
    out = {}
    for c in classes:
        key = c.lower().replace("_", " ").replace("covid-19", "covid").strip()
        key = {"lung opacity": "lung_opacity", "non covid": "non-covid"}.get(key, key)
        findings = FINDINGS.get(key, [c.replace("_", " ").lower()])
        out[c] = [t.format(f) for f in findings for t in TEMPLATES]
    return out


def load_clip(preset: str):
    """(CLIPBackbone, CLIPTokenizer) from a keras-hub preset name or a local preset folder; a folder without
    the tokenizer, or a preset of another model, is refused before weights load where possible."""
    if os.path.isdir(preset):
        missing = [f for f in ("config.json", "tokenizer.json") if not os.path.exists(os.path.join(preset, f))]
        if missing:
            raise ConfigError(f"--preset {preset}: lacks {', '.join(missing)}; a zero-shot preset needs the CLIP "
                              f"backbone and its tokenizer (save_to_preset of both).")
    backbone, tokenizer = load_with_tokenizer(preset, "CLIPBackbone", lambda found: ConfigError(
        f"--preset {preset}: holds a {found}, not a CLIP model (CLIPBackbone)."))
    return backbone, tokenizer


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_embeddings(backbone, tokenizer, prompts: dict[str, list[str]]) -> np.ndarray:
    """Prompt-ensembled, L2-normalised class embeddings ``[K, D]`` float64, in the order of ``prompts``."""
    length = int(backbone.text_encoder.max_sequence_length)
    start, end = tokenizer.start_token_id, tokenizer.end_token_id
    rows = []
    for texts in prompts.values():
        ids = np.full((len(texts), length), end, np.int32)
        for i, t in enumerate(texts):
            toks = [start] + list(np.asarray(tokenizer(t)).reshape(-1).tolist())[: length - 2] + [end]
            ids[i, : len(toks)] = toks
        emb = _unit(np.asarray(backbone.get_text_embeddings(ids), np.float64))
        rows.append(_unit(emb.mean(axis=0)))
    return np.stack(rows)


def image_size_of(backbone) -> int:
    return int(backbone.vision_encoder.image_shape[0])


def image_embeddings(backbone, gray_uint8, batch_size: int = 16) -> np.ndarray:
    """L2-normalised CLIP image embeddings ``[B, D]`` float64 of uint8-range gray images ``[B, S, S, 1]``
    (CLIP's mean/std applied here; images resized to the model's size when S differs)."""
    gray, size, out = np.asarray(gray_uint8, np.float32), image_size_of(backbone), []
    norm = BackboneInput("clip")
    for i in range(0, len(gray), batch_size):
        x = ops.convert_to_tensor(gray[i: i + batch_size])
        if x.shape[1] != size or x.shape[2] != size:
            x = ops.image.resize(x, (size, size), interpolation="bilinear", antialias=True)
        out.append(np.asarray(backbone.get_vision_embeddings(norm(x)), np.float64))
    return _unit(np.concatenate(out)) if out else np.zeros((0, int(backbone.projection_dim)))


def softmax_probs(img_emb: np.ndarray, txt_emb: np.ndarray, logit_scale: float = DEFAULT_LOGIT_SCALE) -> np.ndarray:
    """``softmax(logit_scale * cos(image, class))``: ``[B, K]`` rows summing to 1."""
    logits = logit_scale * _unit(np.asarray(img_emb, np.float64)) @ _unit(np.asarray(txt_emb, np.float64)).T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)

"""Zero-shot classification with a SigLIP model (MedSigLIP): text prompts against the image.

SigLIP is trained with a *sigmoid* loss: each (image, text) pair gets an independent
probability ``sigmoid(scale * cos(image, text) + bias)``, with ``scale`` and ``bias``
learned in training (keras-hub keeps them in ``backbone.siglip_head``; the scale is stored
as its log). These per-class scores do not sum to 1 (an image may match several prompts, or
none); ``scores_to_probabilities`` renormalises them per image when a single-label decision
and a probability vector are wanted (metrics, calibration plots), which is a choice of ours,
not part of SigLIP.

Prompt ensembles: every prompt is embedded and L2-normalised, the prompts of a class are
averaged and the mean renormalised. Text is canonicalised as keras-hub's
``SigLIPPreprocessor`` does (lower case, punctuation removed), tokenised, closed with the end
token and padded with the pad token to the text tower's full length: SigLIP's text tower
reads the *last* position, so sequences must have the length it was trained with.

Usage (``load_siglip`` accepts a keras-hub preset name such as ``medsiglip_900m_448`` or a
local folder written by ``backbone.save_to_preset(DIR)`` and ``tokenizer.save_to_preset(DIR)``)::

    backbone, tok = load_siglip("medsiglip_900m_448")
    txt = text_embeddings(backbone, tok, cxr_prompts(classes))
    img = image_embeddings(backbone, gray_uint8)                 # [B, S, S, 1] 0..255
    scores = sigmoid_scores(img, txt, *logit_params(backbone))   # [B, K] independent
    probs = scores_to_probabilities(scores)                      # [B, K] rows sum to 1
"""
from __future__ import annotations

import os
import re

import numpy as np
from keras import ops

from covidcxr.errors import ConfigError, DataError
from covidcxr.models.layers import BackboneInput
from covidcxr.models.presets import describe_preset, load_with_tokenizer
from covidcxr.vlm.clip import default_prompts

TOKENIZER_FILES = ("tokenizer.json", os.path.join("assets", "tokenizer", "vocabulary.spm"))
_PUNCT = re.compile(r"[!\"#$%&\\'()*+,\-./:;<=>?@\[\]^_`{|}~]")


def _check_folder(preset: str) -> None:
    missing = [f for f in ("config.json",) + TOKENIZER_FILES if not os.path.exists(os.path.join(preset, f))]
    if missing:
        raise ConfigError(f"--preset {preset}: lacks {', '.join(missing)}; zero-shot needs the SigLIP backbone and "
                          f"its tokenizer in one folder (backbone.save_to_preset(DIR) and "
                          f"tokenizer.save_to_preset(DIR)).")


def _refusal(preset: str, found: str) -> ConfigError:
    hint = (" For a CLIP model use the CLIP zero-shot (python -m covidcxr.zeroshot --model clip --preset ...)."
            if found == "CLIPBackbone" else "")
    return ConfigError(f"--preset {preset}: holds a {found}, but SigLIP zero-shot needs a SigLIPBackbone preset "
                       f"(e.g. medsiglip_900m_448).{hint}")


def _refuse_non_siglip(preset: str, found: str) -> None:
    """Before loading: ``found`` is the class a preset's config.json names (text in a file)."""
    if found != "SigLIPBackbone":
        raise _refusal(preset, found)


def load_siglip(preset: str):
    """(SigLIPBackbone, SigLIPTokenizer) from a keras-hub preset name, handle or local preset folder.
    A CLIP (or any non-SigLIP) preset and a folder without tokenizer files are refused."""
    info = describe_preset(preset)
    _refuse_non_siglip(preset, info.cls if info.fmt == "keras" else f"Hugging Face '{info.cls}' checkpoint")
    if os.path.isdir(preset):
        _check_folder(preset)
    backbone, tokenizer = load_with_tokenizer(preset, "SigLIPBackbone", lambda found: _refusal(preset, found))
    return backbone, tokenizer


def image_size_of(backbone) -> int:
    return int(backbone.vision_encoder.image_shape[0])


def logit_params(backbone) -> tuple[float, float]:
    """The learned (scale, bias) of ``sigmoid(scale * cos + bias)``; keras-hub stores log(scale)."""
    head = backbone.siglip_head
    return float(np.exp(np.asarray(head.logit_scale))), float(np.asarray(head.logit_bias))


def canonicalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (keras-hub ``SigLIPPreprocessor``)."""
    return re.sub(r"\s+", " ", _PUNCT.sub("", text.lower())).strip()


def token_ids(tokenizer, texts: list[str], length: int, canonical: bool = True) -> np.ndarray:
    """``[n, length]`` int32: tokens (truncated), the end token, then pad tokens to ``length``."""
    ids = np.full((len(texts), length), tokenizer.pad_token_id, np.int32)
    for i, t in enumerate(texts):
        toks = list(np.asarray(tokenizer(canonicalize(t) if canonical else t)).reshape(-1).tolist())[: length - 1]
        toks.append(tokenizer.end_token_id)
        ids[i, : len(toks)] = toks
    return ids


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_embeddings(backbone, tokenizer, prompts: dict[str, list[str]], canonical: bool = True) -> np.ndarray:
    """Prompt-ensembled, L2-normalised class embeddings ``[K, D]`` float32, in the order of ``prompts``
    (``canonical``: canonicalise the text first, as keras-hub's SigLIPPreprocessor does by default)."""
    length = int(backbone.text_encoder.max_sequence_length)
    rows = []
    for name, texts in prompts.items():
        if not texts:
            raise DataError(f"no prompts for class '{name}'.")
        ids = token_ids(tokenizer, list(texts), length, canonical)
        emb = _unit(np.asarray(backbone.get_text_embeddings(ids), np.float64))
        rows.append(_unit(emb.mean(axis=0)))
    return np.stack(rows).astype(np.float32)


def gray_to_siglip(gray, image_size: int):
    """uint8-range gray ``[B, S, S, 1]`` -> ``[B, N, N, 3]`` in SigLIP's [-1, 1], resized to ``N`` if needed."""
    x = ops.convert_to_tensor(np.asarray(gray, np.float32))
    if x.shape[1] != image_size or x.shape[2] != image_size:
        x = ops.image.resize(x, (image_size, image_size), interpolation="bilinear", antialias=True)
    return BackboneInput("siglip")(x)


def image_embeddings(backbone, gray_uint8, batch_size: int = 16) -> np.ndarray:
    """L2-normalised SigLIP image embeddings ``[B, D]`` float32 of uint8-range gray images ``[B, S, S, 1]``
    (SigLIP's normalisation is applied here; images are resized to the model's size when S differs)."""
    gray = np.asarray(gray_uint8)
    if gray.ndim != 4 or gray.shape[-1] != 1:
        raise DataError(f"image_embeddings wants gray images [B, S, S, 1]; got shape {gray.shape}.")
    size, out = image_size_of(backbone), []
    for i in range(0, len(gray), batch_size):
        x = gray_to_siglip(gray[i: i + batch_size], size)
        out.append(np.asarray(backbone.vision_encoder({"images": x}), np.float64))
    emb = np.concatenate(out) if out else np.zeros((0, int(backbone.vision_encoder.hidden_dim)))
    return _unit(emb).astype(np.float32)


def sigmoid_scores(img_emb, txt_emb, logit_scale: float, logit_bias: float) -> np.ndarray:
    """``sigmoid(logit_scale * cos(image, class) + logit_bias)``: ``[B, K]``, independent per class, in (0, 1).
    ``logit_scale`` is the multiplier itself (``logit_params`` gives it exponentiated)."""
    cos = _unit(np.asarray(img_emb, np.float64)) @ _unit(np.asarray(txt_emb, np.float64)).T
    z = logit_scale * cos + logit_bias
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = sigmoid(z), without overflow for large |z|


def scores_to_probabilities(scores) -> np.ndarray:
    """Per-image renormalisation of independent sigmoid scores ``[B, K]`` to rows that sum to 1.
    Rows whose scores all underflow to 0 become uniform."""
    s = np.asarray(scores, np.float64)
    total = s.sum(axis=1, keepdims=True)
    return np.where(total > 0, s / np.where(total > 0, total, 1.0), 1.0 / s.shape[1])


def cxr_prompts(classes: list[str]) -> dict[str, list[str]]:
    """Default chest-X-ray prompt ensembles for the Kaggle (COVID, Lung_Opacity, Normal, Viral Pneumonia) and
    COVID-QU-Ex (COVID-19, Non-COVID, Normal) class names; other names get prompts built from the name."""
    return default_prompts(list(classes))


def check_prompts(prompts: dict[str, list[str]], classes: list[str], source: str = "--prompts") -> dict:
    """Refuse prompts for a class the data lacks, or a data class without prompts; returns them in class order."""
    extra = sorted(set(prompts) - set(classes))
    if extra:
        raise DataError(f"{source}: class(es) {extra} are not in the data (classes: {list(classes)}); rename them or "
                        f"remove their prompts.")
    missing = [c for c in classes if not prompts.get(c)]
    if missing:
        raise DataError(f"{source}: no prompts for class(es) {missing}; give at least one prompt per class.")
    return {c: list(prompts[c]) for c in classes}

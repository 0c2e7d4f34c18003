"""Text-prompted segmentation: SigLIP places box/point prompts, SAM draws the mask.

1. ``similarity_map``: cosine similarity of each SigLIP image patch with the prompt's text
   embedding, ``[B, g, g]`` (g = image size / patch size; 28 for MedSigLIP at 448 px).
   SigLIP has no projection after its image tower: the image embedding *is* the output of its
   multi-head attention pooling ("MAP") head, where one learned probe query attends over all
   patch tokens, followed by a residual LayerNorm + MLP. We apply that head to every patch
   token on its own (a one-token sequence): the attention weight is then exactly 1, so each
   patch gets the embedding the pooled output would have if the image were that token alone,
   in the same space as the text embeddings. This is the MaskCLIP recipe (Zhou et al., ECCV
   2022) for attention-pooled encoders: keep the pooling's value/output path and MLP, drop
   the query-key weighting. Such maps are coarse and noisy, so they only place prompts.
2. ``prompts_from_map``: the map is min-max normalised per image; the box (xyxy pixels)
   spans the cells at or above ``threshold``, the points are the ``top_k`` best cells
   (label 1) and optionally the ``negatives`` worst ones (label 0), at cell centres (x, y).
3. ``sam_segment``: keras-hub SAM (``SAMImageSegmenter`` or ``SAMBackbone``) with those
   prompts. SAM's ViTDet encoder normalises [0, 1] RGB itself (ImageNet mean/std); prompts
   are in the pixel frame of SAM's input size (1024 for the published presets), so images
   are resized to it and coordinates scaled. SAM's low-resolution mask logits are resized to
   the input size and thresholded at 0.

``SEG_PROMPTS`` holds default phrasings for "lungs" and "opacity"; ``read_prompt_file``
reads ``{name: [prompts]}`` from JSON or YAML; ``check_segmentation_prompt`` refuses a text
prompt for a model that cannot take one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from keras import ops
import yaml

from covidcxr.errors import ConfigError, DataError
from covidcxr.models.layers import BackboneInput
from covidcxr.models.presets import describe_preset
from covidcxr.models.registry import registry
from covidcxr.models.tokens import SigLIPTokens
from covidcxr.vlm.siglip import gray_to_siglip, image_size_of, text_embeddings

SEG_PROMPTS = {
    "lungs": ["the lungs", "both lungs on a chest x-ray", "the lung fields", "the left and right lungs"],
    "opacity": ["a lung opacity", "an area of consolidation in the lung", "ground-glass opacity",
                "a pulmonary infiltrate"],
}


def read_prompt_file(path: str | Path) -> dict[str, list[str]]:
    """``{name: [prompt, ...]}`` from a JSON or YAML file (``.yaml``/``.yml``), each list non-empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--prompts {path}: no such file.")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            doc = yaml.safe_load(path.read_text())
        else:
            doc = json.loads(path.read_text())
    except Exception as exc:
        raise DataError(f"--prompts {path}: cannot parse it ({exc}).") from exc
    ok = isinstance(doc, dict) and doc and all(
        isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v) for v in doc.values())
    if not ok:
        raise DataError(f"--prompts {path}: expected {{\"name\": [\"prompt\", ...]}} with a non-empty list of "
                        f"strings per name.")
    return {str(k): list(v) for k, v in doc.items()}


def resolve_prompt(prompt: str | list[str], prompt_sets: dict[str, list[str]] | None = None) -> list[str]:
    """A prompt-set name ("lungs", or a name from ``prompt_sets``) -> its phrasings; free text -> [text]."""
    sets = {**SEG_PROMPTS, **(prompt_sets or {})}
    if isinstance(prompt, str):
        return list(sets.get(prompt, [prompt]))
    if not prompt:
        raise DataError("empty prompt list.")
    return list(prompt)


def _kind_of_name(name: str) -> str:
    """Class a registry name or a preset (name, folder, handle) stands for; medsiglip loads both towers."""
    spec = registry().get(name)
    if spec is not None:
        return "SigLIPBackbone" if spec.constructor == "SigLIPVisionEncoder" else spec.constructor
    info = describe_preset(name)
    return info.cls if info.fmt == "keras" else f"Hugging Face '{info.cls}'"


def check_segmentation_prompt(model, prompt: str) -> None:
    """Raise ConfigError unless ``model`` can read a text prompt for segmentation: a SigLIP model with
    both towers (a ``SigLIPBackbone``, or the registry name ``medsiglip``)."""
    if isinstance(model, str):
        kind, label = _kind_of_name(model), model
    else:
        kind, label = type(model).__name__, getattr(model, "name", type(model).__name__)
    if kind == "SigLIPBackbone":
        return
    outputs = getattr(model, "output", None)
    if isinstance(outputs, dict) and "mask" in outputs:
        why = "a trained segmentation model: it segments what it was trained on and reads no text; drop --prompt"
    else:
        why = (f"a classification-only model ({kind}): it has no image-text patch features to place a prompt; "
               f"use --model medsiglip (SigLIP, both towers) with a SAM model")
    raise ConfigError(f"--prompt {prompt!r}: {label} is {why}.")


def patch_embeddings(siglip_backbone, gray_uint8, batch_size: int = 8) -> np.ndarray:
    """L2-normalised per-patch SigLIP embeddings ``[B, g, g, D]`` (MAP head on each patch token alone)."""
    enc = siglip_backbone.vision_encoder
    size, dim = image_size_of(siglip_backbone), int(enc.hidden_dim)
    grid = size // int(enc.patch_size)
    tokens_of = SigLIPTokens(enc, pooled=False)
    gray, out = np.asarray(gray_uint8), []
    for i in range(0, len(gray), batch_size):
        tokens = tokens_of(gray_to_siglip(gray[i: i + batch_size], size))
        emb = np.asarray(enc.head(ops.reshape(tokens, (-1, 1, dim))), np.float64)
        out.append(emb.reshape(-1, grid, grid, dim))
    emb = np.concatenate(out)
    return (emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def similarity_map(siglip_backbone, tokenizer, gray_uint8, prompt: str | list[str],
                   prompt_sets: dict[str, list[str]] | None = None, batch_size: int = 8) -> np.ndarray:
    """Cosine similarity ``[B, g, g]`` float32 of each patch with the (ensembled) prompt text embedding."""
    txt = text_embeddings(siglip_backbone, tokenizer, {"prompt": resolve_prompt(prompt, prompt_sets)})[0]
    return np.einsum("bhwd,d->bhw", patch_embeddings(siglip_backbone, gray_uint8, batch_size), txt)


def prompts_from_map(sim, image_size: int, threshold: float = 0.5, top_k: int = 3, negatives: int = 0):
    """(boxes ``[B, 4]`` xyxy pixels, points ``[B, P, 2]`` (x, y) pixels, labels ``[B, P]`` 1/0) from a
    similarity map ``[B, g, g]``; P = ``top_k + negatives``."""
    sim = np.asarray(sim, np.float64)
    b, g = sim.shape[0], sim.shape[1]
    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold {threshold}: use a fraction in [0, 1] of the per-image similarity range.")
    if not 0 < top_k <= g * g or not 0 <= negatives <= g * g - top_k:
        raise ConfigError(f"top_k {top_k} / negatives {negatives}: the map has only {g * g} cells.")
    lo, hi = sim.min(axis=(1, 2), keepdims=True), sim.max(axis=(1, 2), keepdims=True)
    norm = np.where(hi - lo > 1e-12, (sim - lo) / np.maximum(hi - lo, 1e-12), 1.0)
    cell = image_size / g
    boxes = np.zeros((b, 4), np.float32)
    points = np.zeros((b, top_k + negatives, 2), np.float32)
    labels = np.concatenate([np.ones((b, top_k)), np.zeros((b, negatives))], axis=1).astype(np.float32)
    for i in range(b):
        rows, cols = np.nonzero(norm[i] >= threshold)
        boxes[i] = [cols.min() * cell, rows.min() * cell, (cols.max() + 1) * cell, (rows.max() + 1) * cell]
        order = np.argsort(-norm[i].ravel(), kind="stable")
        picked = np.concatenate([order[:top_k], order[::-1][:negatives]])
        r, c = np.divmod(picked, g)
        points[i] = np.stack([(c + 0.5) * cell, (r + 0.5) * cell], axis=1)
    return boxes, points, labels


def _sam_parts(sam_model):
    """(SAMImageSegmenter, SAM input side, prompt-frame side, mask-prompt side) for a segmenter or backbone."""
    import keras_hub  # seconds to import; only keras-hub architectures and presets need it

    backbone = getattr(sam_model, "backbone", sam_model)
    if type(backbone).__name__ != "SAMBackbone":
        raise ConfigError(f"sam_segment needs a keras-hub SAMImageSegmenter or SAMBackbone (e.g. the preset "
                          f"sam_base_sa1b), not a {type(sam_model).__name__}.")
    seg = sam_model if isinstance(sam_model, keras_hub.models.SAMImageSegmenter) else \
        keras_hub.models.SAMImageSegmenter(backbone=backbone)
    pe = backbone.prompt_encoder
    return seg, int(backbone.image_encoder.input.shape[1]), int(pe.input_image_size[0]), \
        4 * int(pe.image_embedding_size[0])


def _sam_inputs(images, boxes, points, labels, scale: float, mask_side: int) -> dict:
    """SAM's input dict; a point-only prompt gets SAM's padding point (0, 0) with label -1."""
    b = images.shape[0]
    if boxes is None and points is None:
        raise ConfigError("sam_segment needs a box or points (see prompts_from_map).")
    pts = np.zeros((b, 0, 2), np.float32) if points is None else np.asarray(points, np.float32) * scale
    lab = np.zeros((b, 0), np.float32) if points is None else np.asarray(labels, np.float32)
    if boxes is None:
        pts = np.concatenate([pts, np.zeros((b, 1, 2), np.float32)], axis=1)
        lab = np.concatenate([lab, -np.ones((b, 1), np.float32)], axis=1)
        box = np.zeros((b, 0, 2, 2), np.float32)
    else:
        box = (np.asarray(boxes, np.float32) * scale).reshape(b, 1, 2, 2)
    return {"images": images, "points": pts, "labels": lab, "boxes": box,
            "masks": np.zeros((b, 0, mask_side, mask_side, 1), np.float32)}


def sam_segment(sam_model, gray_uint8, boxes=None, points=None, labels=None, batch_size: int = 4,
                select: str = "auto") -> np.ndarray:
    """Masks ``[B, S, S]`` bool from SAM for uint8-range gray images ``[B, S, S, 1]`` and prompts in their
    pixel frame (boxes ``[B, 4]`` xyxy; points ``[B, P, 2]`` (x, y) with labels ``[B, P]``). ``select``:
    'first' (SAM's single-mask output), 'best' (highest predicted IoU of the multimask outputs), 'auto'
    ('first' with a box, 'best' for points only, as SAM's authors advise)."""
    gray = np.asarray(gray_uint8, np.float32)
    size = gray.shape[1]
    seg, side, frame, mask_side = _sam_parts(sam_model)
    pick_best = select == "best" or (select == "auto" and boxes is None)
    out = []
    for i in range(0, len(gray), batch_size):
        sl = slice(i, i + batch_size)
        x = ops.image.resize(ops.convert_to_tensor(gray[sl]), (side, side), interpolation="bilinear")
        x = BackboneInput("unit")(x)  # [0, 1] RGB: SAM's image encoder applies ImageNet mean/std itself
        inp = _sam_inputs(np.asarray(x), None if boxes is None else np.asarray(boxes)[sl],
                          None if points is None else np.asarray(points)[sl],
                          None if labels is None else np.asarray(labels)[sl], frame / size, mask_side)
        res = seg(inp)
        masks, iou = np.asarray(res["masks"]), np.asarray(res["iou_pred"])
        k = (1 + np.argmax(iou[:, 1:], axis=1)) if pick_best and masks.shape[1] > 1 else np.zeros(len(masks), int)
        chosen = masks[np.arange(len(masks)), k][..., None]
        out.append(np.asarray(ops.image.resize(chosen, (size, size), interpolation="bilinear"))[..., 0] > 0)
    return np.concatenate(out)


def check_sam(preset: str) -> None:
    """Refuse (before any weights load) a ``--sam`` preset that is not a keras-hub SAMBackbone."""
    info = describe_preset(preset)
    if info.cls != "SAMBackbone":
        raise ConfigError(f"--sam {preset} holds a {info.cls}, but --sam needs a keras-hub SAM preset (SAMBackbone, "
                          f"e.g. sam_base_sa1b, or a folder written by its save_to_preset).")


def load_sam(preset: str):
    """(SAMImageSegmenter, its input side in pixels) from a keras-hub SAM preset name or folder (wrapped once
    here, so that ``prompted.sam_segment`` does not build a segmenter per batch)."""
    import keras_hub  # seconds to import; only prompted segmentation loads SAM

    check_sam(preset)
    try:
        sam = keras_hub.models.Backbone.from_preset(preset)
    except Exception as exc:
        raise ConfigError(f"--sam {preset}: cannot load a SAM model from it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}). Offline, pass a local preset folder.") from exc
    return keras_hub.models.SAMImageSegmenter(backbone=sam), int(sam.image_encoder.input.shape[1])

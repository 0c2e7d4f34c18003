"""The README.md every export folder carries, which is also its Hugging Face Hub model card: the
MODEL_CARD.md of the export (YAML front matter first) when there is one, else a card built from
``model_card.json`` and ``metrics.json`` in the same format; then what the files are, what the SavedModel
and ``model.onnx`` take and return, and how to load the model, all written from the model's own files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from covidcxr.artifacts import METRICS, ONNX_MODEL, LungCrop, ModelCard
from covidcxr.modelcard import MODEL_CARD
from covidcxr.modelcard.render import front_matter
from covidcxr.tasks import get_task

README = "README.md"


def _inputs(card: ModelCard) -> str:
    text = ("`image_bytes`: `tf.string [batch]`, encoded PNG/JPEG/BMP/GIF of any size, 8- or 16-bit, gray or RGB")
    if card.lung_crop is LungCrop.GIVEN:
        text += "; `lung_mask_bytes`: `tf.string [batch]`, each image's lung mask (any mode; half range and above is lung)"
    return text


def _outputs(card: ModelCard) -> str:
    classes = ", ".join(f"`{c}`" for c in card.classes)
    probs = f"`probabilities` (float32 `[batch, {len(card.classes)}]`, in this order: {classes}) and `label` (string)"
    task = get_task(card.task)
    if task.only_classifies:
        return probs
    seg = (f"`mask` (float32 `[batch, {card.image_size}, {card.image_size}]`, {card.target or 'lung'} probabilities), "
           "`mask_png` (the mask thresholded at 0.5, a PNG at each input's own size), `height`, `width`")
    return seg + (f"; and {probs}" if task.multi_output else "")


def _model_files(card: ModelCard, formats) -> str:
    lines = []
    if "savedmodel" in formats:
        lines.append("- `serving/1/`: TF SavedModel (TF Serving: `--model_base_path=$PWD/serving`).")
    if "onnx" in formats:
        lines.append(f"- `model.onnx`: the model alone for ONNX Runtime (input `image`, float32 uint8-range `[B, "
                     f"{card.image_size}, {card.image_size}, 1]`, preprocessed on the host as below; outputs as the "
                     f"Keras model's): `python -m covidcxr.predict --model path/to/this/folder --engine onnx FILES...` "
                     f"runs it without TensorFlow.")
    return "\n".join(lines)


def _savedmodel_section(card: ModelCard) -> str:
    return f"""## The SavedModel
- `serving_default`: {_inputs(card)} -> {_outputs(card)}. It decodes and preprocesses inside the graph with
  the same integer arithmetic as training, so it sees the training pixels exactly.
- `pixels`: the same inputs -> `pixels` (uint8, the model's input; `image_pixels` before a lung crop).
- `from_pixels`: `pixels` (float32 `[batch, {card.image_size}, {card.image_size}, 1]`, 0..255) -> the model's outputs.
"""


def export_readme(card: ModelCard, checked: str, formats=("savedmodel",)) -> str:
    crop = {LungCrop.NONE: "none", LungCrop.GIVEN: "the image times its given lung mask (a second input)",
            LungCrop.MODEL: "the image times the lung mask its embedded segmenter (`lung_segmenter/`) predicts"}
    return f"""# {card.arch} ({card.task}) exported by covidcxr

**Research use only. Not a medical device; not for diagnosis.**

| | |
|---|---|
| task | {card.task}{f" ({card.target})" if card.target else ""} |
| classes (output order) | {", ".join(card.classes)} |
| input | uint8-range grayscale `[B, {card.image_size}, {card.image_size}, 1]` (`{card.input_format}`) |
| preprocessing | decode (16-bit by its bit depth, RGB by Pillow's integer luma), exact antialiased bilinear resize to {card.image_size} px, contrast `{card.contrast}` |
| lung crop | {crop[card.lung_crop]} |
| trained on the Keras backend | {card.backend or "?"} |
| export check | {checked} |

## Files
{_model_files(card, formats)}
- `model.keras`: the Keras model; `model_card.json`: the card this README is written from.
- `MODEL_CARD.md`: the model card (training data, splits, figures, limitations, TRIPOD+AI / CLAIM table), written
  from `model_card_facts.json`, the facts of the run it was exported from.
- `train_fingerprints.npz`: hashes of its training and validation images (`covidcxr.evaluate`'s overlap guard);
  `calibration.json` when the model was calibrated; `operating_point.json` when it has one (a class's
  threshold, from `covidcxr.evaluate --operating-point`, used by `predict --operating-point`); `lung_segmenter/` for lung-cropped classifiers.

{_savedmodel_section(card) if "savedmodel" in formats else ""}
## In Python (any Keras backend)
```python
import covidcxr

model = covidcxr.load_model("path/to/this/folder")   # registers covidcxr's layers, then loads model.keras
```
A plain `keras.saving.load_model("model.keras")` raises `TypeError` on covidcxr's layers. To score files with
the same decoding: `python -m covidcxr.predict --model path/to/this/folder FILES...`; from the Hugging Face
Hub: `--model hf://OWNER/NAME` (downloaded once into the Hub cache; `HF_HUB_OFFLINE=1` reads only the cache).
"""


def _demoted(text: str) -> str:
    """``text`` one heading level down (outside code blocks), to sit under the model card."""
    out, code = [], False
    for line in text.splitlines():
        code ^= line.startswith("```")
        out.append("#" + line if line.startswith("#") and not code else line)
    return "\n".join(out) + "\n"


def fallback_card(card: ModelCard, metrics: dict) -> str:
    """A Hugging Face card (front matter, figures) from model_card.json and metrics.json alone."""
    task = get_task(card.task)
    facts = {"model": dataclasses.asdict(card), "heads": {"classifies": bool(task.classifies),
                                                          "segments": bool(task.segments)}}
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in flat.items())
    figures = f"## Figures (metrics.json)\n\n| metric | value |\n|---|---|\n{rows}\n" if flat else ""
    return (front_matter(facts) + f"\n# {card.arch} ({card.task}): covidcxr model\n\n"
            "**Research use only. Not a medical device; not for diagnosis.**\n\n" + figures)


def hub_readme(folder: Path, source: Path, card: ModelCard, checked: str) -> str:
    """README.md of the export ``folder``: its MODEL_CARD.md (or a card from ``source``'s files), then the usage."""
    if (folder / MODEL_CARD).exists():
        head = (folder / MODEL_CARD).read_text()
    else:
        metrics = json.loads((source / METRICS).read_text()) if (source / METRICS).exists() else {}
        head = fallback_card(card, metrics)
    there = {"savedmodel": (folder / "serving").is_dir(), "onnx": (folder / ONNX_MODEL).exists()}
    formats = [f for f, yes in there.items() if yes]
    usage = export_readme(card, checked, formats)
    return head.rstrip() + "\n\n" + _demoted(usage)

"""The README.md every export folder carries: what the files are, what the SavedModel takes and
returns, and how to load the Keras model, written from the model's own card (nothing by hand)."""
from __future__ import annotations

from covidcxr.artifacts import LungCrop, ModelCard
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


def export_readme(card: ModelCard, checked: str) -> str:
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
- `serving/1/`: TF SavedModel (TF Serving: `--model_base_path=$PWD/serving`).
- `model.keras`: the Keras model; `model_card.json`: the card this README is written from.
- `MODEL_CARD.md`: the model card (training data, splits, figures, limitations, TRIPOD+AI / CLAIM table), written
  from `model_card_facts.json`, the facts of the run it was exported from.
- `train_fingerprints.npz`: hashes of its training and validation images (`covidcxr.evaluate`'s overlap guard);
  `calibration.json` when the model was calibrated; `operating_point.json` when it has one (a class's
  threshold, from `covidcxr.evaluate --operating-point`, used by `predict --operating-point`); `lung_segmenter/` for lung-cropped classifiers.

## The SavedModel
- `serving_default`: {_inputs(card)} -> {_outputs(card)}. It decodes and preprocesses inside the graph with
  the same integer arithmetic as training, so it sees the training pixels exactly.
- `pixels`: the same inputs -> `pixels` (uint8, the model's input; `image_pixels` before a lung crop).
- `from_pixels`: `pixels` (float32 `[batch, {card.image_size}, {card.image_size}, 1]`, 0..255) -> the model's outputs.

## In Python (any Keras backend)
```python
import covidcxr

model = covidcxr.load_model("path/to/this/folder")   # registers covidcxr's layers, then loads model.keras
```
A plain `keras.saving.load_model("model.keras")` raises `TypeError` on covidcxr's layers. To score files with
the same decoding: `python -m covidcxr.predict --model path/to/this/folder FILES...`.
"""

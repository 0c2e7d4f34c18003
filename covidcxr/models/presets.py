"""What a keras-hub preset or Hugging Face model folder holds, checked before any weights load.

``covidcxr.models.registry.hub_from_preset`` calls ``check_preset`` first, so a wrong
checkpoint fails in a second with a message naming what was found and what was expected,
instead of after a 1-2 GB download or deep inside a converter. A preset can be:

- a keras-hub preset *name* (``dinov2_base``, ``medsiglip_900m_448``): its class is read
  from keras-hub's own preset table, offline;
- a keras-hub or Hugging Face *handle* (``kaggle://keras/medsiglip/keras/medsiglip_900m_448/1``,
  ``hf://microsoft/rad-dino``): only its ``config.json`` is fetched for the check;
- a local *folder*, either a keras-hub preset (``save_to_preset``: ``config.json`` with a
  ``registered_name``, ``metadata.json``, ``model.weights.h5``) or the files of a Hugging
  Face model (``config.json`` with a ``model_type``, ``model.safetensors``). keras-hub's
  transformers converter reads the folder exactly as it reads ``hf://`` (it only swaps the
  download for a local path), which is how an air-gapped user brings RAD-DINO.

This module imports keras-hub only inside functions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from covidcxr.errors import ConfigError
from covidcxr.models.layers import normalization_params

# Hugging Face ``model_type`` values keras-hub's transformers converter turns into each backbone class.
HF_MODEL_TYPES = {
    "DINOV2Backbone": ("dinov2", "dinov2_with_registers"),
    "ViTBackbone": ("vit",),
    "SwinTransformerBackbone": ("swin",),
}
# A full two-tower (image + text) preset gives its image tower.
IMAGE_TOWER = {"CLIPBackbone": "CLIPVisionEncoder", "SigLIPBackbone": "SigLIPVisionEncoder"}
FAMILY = {"CLIPVisionEncoder": "CLIP", "SigLIPVisionEncoder": "SigLIP", "DINOV2Backbone": "DINOv2"}

RAD_DINO_IMAGE_SIZE = 518  # crop_size of the same preprocessor_config.json (37 x 37 patches of 14 px)



@dataclass(frozen=True)
class PresetInfo:
    """``fmt``: 'keras' or 'hf'; ``cls``: keras-hub class name (keras) or the Hugging Face model_type (hf)."""
    preset: str
    fmt: str
    cls: str
    local: bool


def _builtin_class(name: str) -> str | None:
    from keras_hub.src.utils import preset_utils  # seconds to import; only keras-hub architectures and presets need it

    for cls, presets in preset_utils.BUILTIN_PRESETS_FOR_BACKBONE.items():
        if name in presets:
            return cls.__name__
    return None


def _read_local_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"preset folder {folder} has no config.json: not a keras-hub preset (write one with "
                          f"backbone.save_to_preset(DIR)) nor a Hugging Face model folder (config.json + "
                          f"model.safetensors).")
    try:
        return json.loads(open(path, encoding="utf-8").read())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}).") from exc


def _check_local_files(folder: str, config: dict) -> None:
    have = set(os.listdir(folder))
    if "registered_name" in config:
        missing = [f for f in ("metadata.json",) if f not in have]
        if missing:
            raise ConfigError(f"preset folder {folder} lacks {', '.join(missing)}: not a keras-hub preset "
                              f"(write one with backbone.save_to_preset(DIR)).")
    elif "model_type" in config:
        if not {"model.safetensors", "model.safetensors.index.json"} & have:
            other = sorted(have & {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"})
            raise ConfigError(f"Hugging Face folder {folder} has no model.safetensors"
                              f"{' (only ' + ', '.join(other) + ')' if other else ''}: keras-hub reads safetensors "
                              f"only. Download model.safetensors from the model page, or convert the checkpoint.")
    else:
        raise ConfigError(f"preset folder {folder}: config.json has neither 'registered_name' (keras-hub preset) "
                          f"nor 'model_type' (Hugging Face model): not a model folder this tool can read.")


def describe_preset(preset: str) -> PresetInfo:
    """Format and class of ``preset`` without loading weights (a remote handle: its config.json only)."""
    if os.path.isdir(preset):
        config = _read_local_config(preset)
        _check_local_files(preset, config)
        local = True
    else:
        name = _builtin_class(preset)
        if name is not None:
            return PresetInfo(preset, "keras", name, False)
        if "://" not in preset:
            raise ConfigError(f"--preset {preset}: not a keras-hub preset name, nor a folder, nor a handle such as "
                              f"hf://microsoft/rad-dino or kaggle://OWNER/MODEL/keras/VARIANT.")
        from keras_hub.src.utils import preset_utils  # seconds to import; only keras-hub architectures and presets need it

        config = preset_utils.load_json(preset, "config.json")
        local = False
    if "registered_name" in config:
        return PresetInfo(preset, "keras", str(config["registered_name"]).split(">")[-1], local)
    if "model_type" in config:
        return PresetInfo(preset, "hf", str(config["model_type"]), local)
    raise ConfigError(f"--preset {preset}: its config.json is neither a keras-hub nor a Hugging Face config.")


def check_preset(spec, preset: str) -> PresetInfo:
    """Refuse a preset that does not hold ``spec``'s architecture; name what it holds and what to do."""
    info = describe_preset(preset)
    if info.fmt == "hf":
        expected = HF_MODEL_TYPES.get(spec.constructor)
        if not expected:
            raise ConfigError(f"--preset {preset} is a Hugging Face '{info.cls}' checkpoint, but keras-hub cannot "
                              f"convert Hugging Face checkpoints into a {spec.constructor} ({spec.name}): pass a "
                              f"keras-hub preset (e.g. '{spec.hub_preset}' or a save_to_preset folder).")
        if info.cls not in expected:
            raise ConfigError(f"--preset {preset} is a Hugging Face '{info.cls}' checkpoint (config.json model_type), "
                              f"but {spec.name} is a {spec.constructor} and expects model_type "
                              f"{' or '.join(repr(e) for e in expected)} (e.g. {spec.hub_preset}); pick the --arch "
                              f"that matches the checkpoint or the right folder.")
        return info
    tower = IMAGE_TOWER.get(info.cls, info.cls)
    if tower != spec.constructor:
        held = info.cls if tower == info.cls else f"{info.cls} (image tower {tower})"
        family = FAMILY.get(spec.constructor, spec.constructor)
        raise ConfigError(f"preset {preset} holds a {held}, but {spec.name} is a {spec.constructor} ({family}); "
                          f"pick the --arch that matches the preset.")
    return info


def check_hf_preprocessing(spec, info: PresetInfo) -> None:
    """A Hugging Face checkpoint's ``preprocessor_config.json`` mean/std must match ``spec``'s normalisation
    (else the weights would see images scaled unlike in training). Skipped when the file is absent/unreachable."""
    if info.fmt != "hf":
        return

    try:
        if info.local:
            path = os.path.join(info.preset, "preprocessor_config.json")
            if not os.path.exists(path):
                return
            pre = json.loads(open(path, encoding="utf-8").read())
        else:
            from keras_hub.src.utils import preset_utils  # seconds to import; only keras-hub architectures and presets need it

            pre = preset_utils.load_json(info.preset, "preprocessor_config.json")
    except (OSError, ValueError):
        return
    if not pre.get("do_normalize", True) or "image_mean" not in pre:
        return
    scale, mean, std = normalization_params(spec.normalization)
    got_mean, got_std = [float(v) for v in pre["image_mean"]], [float(v) for v in pre.get("image_std", [1.0] * 3)]
    ok = scale == 1.0 and all(abs(a - b) < 1e-3 for a, b in zip(got_mean + got_std, list(mean) + list(std)))
    if not ok:
        raise ConfigError(f"--preset {info.preset}: its preprocessor_config.json normalises with mean {got_mean}, "
                          f"std {got_std}, but {spec.name} normalises with '{spec.normalization}' (mean "
                          f"{list(mean)}, std {list(std)}): these are not {spec.name} weights. Use the --arch made "
                          f"for this checkpoint (rad_dino for microsoft/rad-dino, dinov2_* for facebook/dinov2-*).")


def check_native_size(spec, model, image_size: int, preset: str) -> None:
    """CLIP/SigLIP presets have learned position embeddings for one image size, which keras-hub does not
    interpolate: refuse another --image-size before the first batch fails."""
    shape = getattr(model, "image_shape", None)
    native = shape[0] if shape else None
    if native is not None and int(native) != int(image_size):
        raise ConfigError(f"preset {preset} is built for {native} px images and {spec.name}'s position embeddings "
                          f"are fixed to that size: use --image-size {native}.")


def load_with_tokenizer(preset: str, backbone_class: str, refuse) -> tuple:
    """(backbone, tokenizer) of a two-tower keras-hub preset (zero-shot CLIP / SigLIP). A load failure
    is a ConfigError naming the preset; a backbone that is not a ``keras_hub.models.<backbone_class>``
    raises ``refuse(found_class_name)``."""
    import keras_hub  # seconds to import; only the zero-shot commands load two-tower presets

    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
        tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(preset)
    except Exception as exc:
        raise ConfigError(f"--preset {preset}: cannot load a {FAMILY.get(IMAGE_TOWER.get(backbone_class), '')} model "
                          f"and tokenizer from it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Offline, "
                          f"pass a local preset folder.") from exc
    if not isinstance(backbone, getattr(keras_hub.models, backbone_class)):
        raise refuse(type(backbone).__name__)
    return backbone, tokenizer

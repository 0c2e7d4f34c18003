"""One table of backbones by name: builder, input normalisation, skip layers, weights.

Each entry builds a *feature extractor* (no classifier top) from
``keras.applications`` or ``keras-hub``. ``skips`` names the layers a U-Net
decoder taps, from high to low resolution (as in segmentation_models).
``weights`` is ``'imagenet'``, ``None``, or a local path:

- keras.applications: an ``.h5`` file as Keras publishes it (its md5/sha256 is
  checked when the file name matches a published one) or a ``.weights.h5``;
- keras-hub: a preset directory (what ``save_to_preset`` writes) or a
  ``.weights.h5`` file.

keras-hub presets by name or handle are passed as ``preset:NAME`` (``covidcxr.models.weights``) (``--preset NAME``);
``hf://`` and ``kaggle://`` handles are also accepted as ``weights`` directly. A local
folder may also hold a Hugging Face checkpoint (``config.json`` with ``model_type`` +
``model.safetensors``), read by keras-hub's transformers converter exactly as ``hf://``
is (see ``covidcxr.models.presets``, which checks every preset before loading).

Chest-X-ray foundation encoders:

- ``rad_dino``: RAD-DINO (Microsoft; a DINOv2 ViT-B/14 trained on chest X-rays), from its
  Hugging Face checkpoint. ``--weights imagenet`` (the entry's default pretrained weights)
  or ``--preset hf://microsoft/rad-dino`` downloads it; offline, download ``config.json``
  and ``model.safetensors`` (and ``preprocessor_config.json``, checked against the
  normalisation below) from https://huggingface.co/microsoft/rad-dino into a folder and
  pass ``--preset /models/rad-dino`` (or ``--weights /models/rad-dino``). Its own
  normalisation ``rad_dino`` (mean 0.5307, std 0.2583); native size 518 px, any multiple of
  14 works (position embeddings are interpolated).
- ``medsiglip``: MedSigLIP's image tower (Google; SigLIP so400m, 448 px), from the keras-hub
  preset ``medsiglip_900m_448`` (``--weights imagenet`` or ``--preset medsiglip_900m_448``)
  or a local copy of it (``--preset /models/medsiglip``: ``save_to_preset`` folder of the
  full ``SigLIPBackbone``; its image tower is taken). Normalisation ``siglip`` ([-1, 1]);
  the image size must be the preset's (448). As a classifier backbone it returns the pooled
  SigLIP image embedding as ``[B, 1, D]`` (see ``covidcxr.models.tokens``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
import json
from pathlib import Path

import keras

from covidcxr.errors import ConfigError
from covidcxr.models.presets import check_hf_preprocessing, check_native_size, check_preset
from covidcxr.models.tokens import as_registry_backbone
from covidcxr.models.weights import WeightsSource


@dataclass(frozen=True)
class ArchSpec:
    name: str
    source: str                      # 'keras.applications' or 'keras-hub'
    normalization: str               # see covidcxr.data.preprocess.normalize
    constructor: str                 # class or function name in its library
    skips: tuple[str, ...] = ()
    hub_preset: str = ""
    hub_config: dict = field(default_factory=dict)
    size_multiple: int = 32          # --image-size must be a multiple of this
    min_size: int = 32
    published_weights: Mapping = field(default_factory=dict)  # file name -> hash
    needs_preset: bool = False       # a foundation encoder: random initialisation is not what it is for


def _ka(name, ctor, norm, skips, files=None, **kw):
    return ArchSpec(name, "keras.applications", norm, ctor, tuple(skips),
                    published_weights={} if files is None else files, **kw)


class _Published(Mapping):
    """File name -> hash of a keras.applications weights file, read from the constants Keras downloads
    with on first use, so that listing the registry (``train --help``, ``--arch list``) imports no Keras."""

    def __init__(self, module: str, key, top: str, notop: str, table: str = "WEIGHTS_HASHES"):
        self._where = (module, key, top, notop, table)

    @functools.cached_property
    def _hashes(self) -> dict:
        module, key, top, notop, table = self._where
        try:
            hashes = getattr(importlib.import_module(f"keras.src.applications.{module}"), table)[key]
        except Exception:  # pragma: no cover - Keras moved its constants: skip the check
            return {}
        return {top: hashes[0], notop: hashes[1]}

    def __getitem__(self, name: str) -> str:
        return self._hashes[name]

    def __iter__(self):
        return iter(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)


def _foundation_specs() -> list[ArchSpec]:
    """Chest-X-ray foundation encoders (issue "Chest-X-ray foundation models"); see the module docstring."""
    return [
        ArchSpec("rad_dino", "keras-hub", "rad_dino", "DINOV2Backbone", hub_preset="hf://microsoft/rad-dino",
                 hub_config=dict(patch_size=14, num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072,
                                 position_embedding_shape=(518, 518, 3)),
                 size_multiple=14, min_size=28, needs_preset=True),
        ArchSpec("medsiglip", "keras-hub", "siglip", "SigLIPVisionEncoder", hub_preset="medsiglip_900m_448",
                 hub_config=dict(patch_size=16, hidden_dim=1152, num_layers=27, num_heads=16, intermediate_dim=4304),
                 size_multiple=16, min_size=32, needs_preset=True),
    ]


def _specs() -> dict[str, ArchSpec]:
    resnet_skips = ("conv1_relu", "conv2_block3_out", "conv3_block4_out")
    specs = [
        _ka("resnet50", "ResNet50", "caffe", resnet_skips + ("conv4_block6_out",),
            _Published("resnet", "resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                       "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        _ka("resnet101", "ResNet101", "caffe", resnet_skips + ("conv4_block23_out",),
            _Published("resnet", "resnet101", "resnet101_weights_tf_dim_ordering_tf_kernels.h5",
                       "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        _ka("densenet121", "DenseNet121", "torch", ("conv1_relu", "pool2_relu", "pool3_relu", "pool4_relu"),
            {"densenet121_weights_tf_dim_ordering_tf_kernels.h5": "9d60b8095a5708f2dcce2bca79d332c7",
             "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5": "30ee3e1110167f948a6b9946edeeb738"}),
        _ka("mobilenetv3small", "MobileNetV3Small", "raw255",
            ("conv_bn", "expanded_conv_project_bn", "expanded_conv_2_add", "expanded_conv_7_add"),
            _Published("mobilenet_v3", "small_224_1.0_float", "weights_mobilenet_v3_small_224_1.0_float.h5",
                       "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")),
        _ka("convnexttiny", "ConvNeXtTiny", "raw255",
            ("convnext_tiny_stage_0_block_2_identity", "convnext_tiny_stage_1_block_2_identity",
             "convnext_tiny_stage_2_block_8_identity"),
            _Published("convnext", "convnext_tiny", "convnext_tiny.h5", "convnext_tiny_notop.h5")),
    ]
    eff_skips = ("block2a_expand_activation", "block3a_expand_activation",
                 "block4a_expand_activation", "block6a_expand_activation")
    for b in range(8):
        specs.append(_ka(f"efficientnetb{b}", f"EfficientNetB{b}", "raw255", eff_skips,
                         _Published("efficientnet", f"b{b}", f"efficientnetb{b}.h5", f"efficientnetb{b}_notop.h5")))
    specs += [
        ArchSpec("resnet18", "keras-hub", "torch", "ResNetBackbone",
                 ("conv1_relu", "stack0_block1_out", "stack1_block1_out", "stack2_block1_out"),
                 hub_preset="resnet_18_imagenet",
                 hub_config=dict(input_conv_filters=[64], input_conv_kernel_sizes=[7],
                                 stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[2, 2, 2, 2],
                                 stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
                                 use_pre_activation=False)),
        ArchSpec("vit_b16", "keras-hub", "tf", "ViTBackbone", hub_preset="vit_base_patch16_224_imagenet",
                 hub_config=dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
                 size_multiple=16),
        # Self-supervised / language-supervised foundation encoders (issue 6). No BEiT: keras-hub has none.
        ArchSpec("dinov2_small", "keras-hub", "torch", "DINOV2Backbone", hub_preset="dinov2_small",
                 hub_config=dict(patch_size=14, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536),
                 size_multiple=14, min_size=28),
        ArchSpec("dinov2_base", "keras-hub", "torch", "DINOV2Backbone", hub_preset="dinov2_base",
                 hub_config=dict(patch_size=14, num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072),
                 size_multiple=14, min_size=28),
        ArchSpec("clip_vit_b16", "keras-hub", "clip", "CLIPVisionEncoder", hub_preset="clip_vit_base_patch16",
                 hub_config=dict(patch_size=16, hidden_dim=768, num_layers=12, num_heads=12, intermediate_dim=3072,
                                 intermediate_activation="quick_gelu"),
                 size_multiple=16),
    ]
    specs += _foundation_specs()
    specs += [
        ArchSpec("swin_tiny", "keras-hub", "torch", "SwinTransformerBackbone",
                 hub_preset="swin_tiny_patch4_window7_224",
                 hub_config=dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                 patch_size=4),
                 size_multiple=224, min_size=224),
    ]
    return {s.name: s for s in specs}


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, ArchSpec]:
    """The entries, without importing Keras (published hashes are read when first needed)."""
    return _specs()


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, ArchSpec]:
    """All registered architectures."""
    return _table()


def arch_names() -> list[str]:
    """Every registry name, in table order (imports no Keras)."""
    return list(_table())


def spec_table() -> dict[str, ArchSpec]:
    """The entries as they stand (imports no Keras; ``registry()`` before building a model)."""
    return dict(_table())


def get_spec(name: str) -> ArchSpec:
    specs = registry()
    if name not in specs:
        raise ConfigError(f"unknown architecture '{name}'. Registered: {', '.join(specs)}")
    return specs[name]


def check_image_size(spec: ArchSpec, size: int) -> None:
    if size < spec.min_size or size % spec.size_multiple:
        raise ConfigError(f"--image-size {size} does not suit {spec.name}: use a multiple of "
                          f"{spec.size_multiple} of at least {spec.min_size}.")


def file_hash(path: str | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_weights_file(spec: ArchSpec, path: str | Path) -> str:
    """Check a local weights file exists, and its hash when its name is a published one.
    Returns a short note for the log."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--weights {path}: no such file or folder. Use --weights none, imagenet, "
                          f"or the path of a weights file.")
    meta = Path(str(path) + ".json")  # written by covidcxr.pretrain beside its weights
    if meta.exists():
        arch = json.loads(meta.read_text()).get("arch")
        if arch and arch != spec.name:
            raise ConfigError(f"--weights {path}: these are {arch} weights (see {meta.name}); use --arch {arch} "
                              f"or weights pretrained for {spec.name}.")
    expected = spec.published_weights.get(path.name)
    if expected and path.is_file():
        algo = "sha256" if len(expected) == 64 else "md5"
        got = file_hash(path, algo)
        if got != expected:
            raise ConfigError(f"--weights {path}: {algo} {got} does not match the {expected} Keras publishes "
                              f"for {path.name}; the file is corrupt or incomplete. Download it again.")
        return f"{algo} verified against Keras' published hash"
    return "no published hash for this file name; not verified"


def _keras_weights_filename(spec: ArchSpec) -> str:
    notop = [f for f in spec.published_weights if "notop" in f or "no_top" in f]
    return notop[0] if notop else ""


def check_weights(spec: ArchSpec, weights: str | None) -> str | None:
    """Refuse a preset for a keras.applications backbone and a missing or wrong local weights file,
    before anything is built; returns the preset ``weights`` names (or None)."""
    source = WeightsSource.parse(weights)
    preset = source.preset
    if preset is not None and spec.source != "keras-hub":
        raise ConfigError(f"--preset: {spec.name} comes from keras.applications, which has no presets; use "
                          f"--weights imagenet|none|PATH.")
    if source.is_file_or_folder:
        verify_weights_file(spec, weights)
    return preset


def build_backbone(spec: ArchSpec, image_size: int, weights: str | None):
    """Feature extractor for ``spec`` at ``image_size``; ``weights`` imagenet/None/path/PRESET+name/handle."""
    check_image_size(spec, image_size)
    shape = (image_size, image_size, 3)
    preset = check_weights(spec, weights)
    try:
        if spec.source == "keras.applications":
            ctor = getattr(keras.applications, spec.constructor)
            kw = dict(include_top=False, input_shape=shape)
            if spec.constructor.startswith("MobileNetV3"):
                kw["include_preprocessing"] = True
            if weights is None or weights == "imagenet":
                return ctor(weights=weights, **kw)
            if str(weights).endswith(".weights.h5"):
                model = ctor(weights=None, **kw)
                model.load_weights(weights)
                return model
            return ctor(weights=str(weights), **kw)
        import keras_hub  # seconds to import; only keras-hub architectures and presets need it

        if weights == "imagenet":
            return as_registry_backbone(spec, hub_from_preset(spec, spec.hub_preset, shape), image_size, True)
        if preset is not None or (weights is not None and os.path.isdir(weights)):
            found = hub_from_preset(spec, preset if preset is not None else str(weights), shape)
            return as_registry_backbone(spec, found, image_size, True)
        ctor = getattr(keras_hub.models, spec.constructor)
        model = as_registry_backbone(spec, ctor(image_shape=shape, **spec.hub_config), image_size)
        if weights is not None:
            model.load_weights(weights)
        return model
    except ConfigError:
        raise
    except Exception as exc:
        raise _weights_error(spec, weights, exc) from exc


_FIXED_SIZE = ("ResNetBackbone", "CLIPVisionEncoder", "SigLIPVisionEncoder")  # presets built without image_shape


def hub_from_preset(spec: ArchSpec, preset: str, shape):
    """A keras-hub backbone from a preset name, an ``hf://``/``kaggle://`` handle, a local preset folder
    (``save_to_preset``) or a local Hugging Face model folder; a CLIP/SigLIP preset gives its image tower.
    Refuses a preset of another architecture before loading weights (``covidcxr.models.presets``)."""
    import keras_hub  # seconds to import; only keras-hub architectures and presets need it

    info = check_preset(spec, preset)
    check_hf_preprocessing(spec, info)
    kw = {} if spec.constructor in _FIXED_SIZE else {"image_shape": shape}
    model = keras_hub.models.Backbone.from_preset(preset, **kw)
    if hasattr(model, "vision_encoder"):  # CLIPBackbone / SigLIPBackbone: the image tower
        model = model.vision_encoder
    if not isinstance(model, getattr(keras_hub.models, spec.constructor)):
        raise ConfigError(f"preset {preset} holds a {type(model).__name__}, but {spec.name} is a "
                          f"{spec.constructor}; pick the --arch that matches the preset.")
    if spec.constructor in ("CLIPVisionEncoder", "SigLIPVisionEncoder"):
        check_native_size(spec, model, shape[0], preset)
    return model


def _offline_hint(spec: ArchSpec) -> str:
    if spec.source == "keras.applications":
        return (f"download {_keras_weights_filename(spec)} elsewhere and pass --weights /path/to/it "
                f"(or put it in ~/.keras/models/)")
    if spec.hub_preset.startswith("hf://"):
        repo = spec.hub_preset[len("hf://"):]
        return (f"download config.json, model.safetensors and preprocessor_config.json from "
                f"https://huggingface.co/{repo} into a folder and pass it with --preset")
    return f"save the keras-hub preset '{spec.hub_preset}' elsewhere and pass its folder with --weights"


def _weights_error(spec: ArchSpec, weights, exc: Exception) -> ConfigError:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300].rstrip(".")
    if weights == "imagenet":
        what = ("ImageNet weights" if spec.source == "keras.applications"
                else f"the pretrained weights ({spec.hub_preset})")
        return ConfigError(f"could not get {what} for {spec.name} (no internet access?): {text}. "
                           f"Use --weights none to train from scratch, or {_offline_hint(spec)}.")
    if weights is None:
        return ConfigError(f"could not build {spec.name}: {text}")
    preset = WeightsSource.parse(weights).preset
    if preset is not None:
        return ConfigError(f"--preset {preset}: cannot load it for {spec.name} ({text}). "
                           f"Offline, pass a local folder: {_offline_hint(spec)}.")
    return ConfigError(f"--weights {weights}: cannot load it into {spec.name} ({text}). Is it a Keras weights "
                       f"file for this architecture?")


def imagenet_available(spec: ArchSpec) -> bool:
    """True when ImageNet weights are cached locally (no network needed)."""
    if spec.source == "keras.applications":
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        return bool(_keras_weights_filename(spec)) and (cache / _keras_weights_filename(spec)).exists()
    return False

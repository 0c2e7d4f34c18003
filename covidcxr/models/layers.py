"""Layers every covidcxr model starts with (``keras.ops`` only: any backend).

Every model takes **uint8-range grayscale** input: ``[B, S, S, 1]`` with values 0..255
(fed as uint8 and cast in the graph, or as float). ``BackboneInput`` turns that into what
its backbone expects: the channel repeated to RGB and the backbone's own normalisation.
Keeping it inside the model means the host side (cache, loader, SavedModel signature)
never needs to know which backbone it feeds.
"""
from __future__ import annotations

import keras
from keras import ops

# name -> (scale applied to x/255, mean, std) per RGB channel; out = (x/255 * scale - mean) / std
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# rad_dino: the preprocessor_config.json of https://huggingface.co/microsoft/rad-dino
# (BitImageProcessor: resize shortest edge 518, centre crop 518, rescale 1/255, image_mean
# [0.5307, 0.5307, 0.5307], image_std [0.2583, 0.2583, 0.2583]: one value because the
# training images are grey). Copied from the published file, not downloaded at run time;
# ``covidcxr.models.presets.check_hf_preprocessing`` compares it with a checkpoint's own file.
_RAD_DINO_MEAN = (0.5307, 0.5307, 0.5307)
_RAD_DINO_STD = (0.2583, 0.2583, 0.2583)
NORMALIZATIONS: dict[str, tuple[float, tuple, tuple]] = {
    "caffe": (255.0, _CAFFE_MEAN_BGR, (1.0, 1.0, 1.0)),   # BGR means, 0..255 (gray: B = G = R)
    "torch": (1.0, _IMAGENET_MEAN, _IMAGENET_STD),
    "clip": (1.0, _CLIP_MEAN, _CLIP_STD),
    "siglip": (1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),    # [-1, 1]
    "tf": (2.0, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),        # x/127.5 - 1
    "raw255": (255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "unit": (1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "rad_dino": (1.0, _RAD_DINO_MEAN, _RAD_DINO_STD),
}


def normalization_params(mode: str) -> tuple[float, tuple, tuple]:
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {mode!r}; choose from {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[mode]


@keras.saving.register_keras_serializable(package="covidcxr")
class BackboneInput(keras.layers.Layer):
    """uint8-range gray ``[B, S, S, 1]`` -> ``[B, S, S, channels]`` normalised for a backbone.

    ``mode``: one of ``NORMALIZATIONS`` (or a dict ``{"scale", "mean", "std"}`` for a
    normalisation stored in the config as numbers so the model loads
    anywhere). Runs in float32 whatever the global dtype policy.
    """

    def __init__(self, mode: str | dict = "unit", channels: int = 3, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(mode, dict):
            self.scale, self.mean, self.std = float(mode["scale"]), tuple(mode["mean"]), tuple(mode["std"])
            self.mode = dict(mode)
        else:
            self.scale, self.mean, self.std = normalization_params(mode)
            self.mode = mode
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        self.channels = channels

    def call(self, x):
        x = ops.cast(x, "float32") * (self.scale / 255.0)
        if self.channels == 3:
            x = ops.concatenate([x, x, x], axis=-1)
            mean = ops.convert_to_tensor(self.mean, "float32")
            std = ops.convert_to_tensor(self.std, "float32")
        else:
            mean = ops.convert_to_tensor(self.mean[:1], "float32")
            std = ops.convert_to_tensor(self.std[:1], "float32")
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "channels": self.channels}


def gray_input(image_size: int, name: str = "image"):
    """The model input: uint8-range grayscale, float32 so augmented (non-integer) values pass unchanged."""
    return keras.Input((image_size, image_size, 1), dtype="float32", name=name)

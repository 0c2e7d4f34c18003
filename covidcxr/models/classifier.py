"""Classifier = registry backbone + head (global pooling, BN, dropout, softmax).

``build_classifier`` returns an uncompiled model that takes uint8-range grayscale
``[B, S, S, 1]`` (see ``covidcxr.models.layers``). The backbone is a nested
sub-model named ``backbone``: with pretrained weights it is called with
``training=False`` so its BatchNormalization layers stay in inference mode
during fine-tuning; trained from scratch it is called normally and its BN
momentum lowered so the moving statistics catch up with a few hundred steps
(the train/inference BN gap that makes naive from-scratch runs collapse).
"""
from __future__ import annotations

import keras

from covidcxr.models.layers import BackboneInput, gray_input
from covidcxr.models.registry import ArchSpec, build_backbone


def _is_bn(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def iter_layers(layer):
    """Depth-first over a layer and all its sub-layers."""
    yield layer
    for sub in getattr(layer, "_layers", []) or []:
        yield from iter_layers(sub)


def build_classifier(spec: ArchSpec, num_classes: int, image_size: int, weights: str | None,
                     dropout: float = 0.3, bn_momentum: float | None = None) -> keras.Model:
    backbone = build_backbone(spec, image_size, weights)
    backbone.name = "backbone"
    inputs = gray_input(image_size)
    x = BackboneInput(spec.normalization, name="preprocess")(inputs)
    pretrained = weights is not None
    features = backbone(x, training=False) if pretrained else backbone(x)
    pool = keras.layers.GlobalAveragePooling1D if len(features.shape) == 3 else keras.layers.GlobalAveragePooling2D
    x = pool(name="gap")(features)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="label")(x)
    model = keras.Model(inputs, out, name=f"{spec.name}_classifier")
    if bn_momentum is not None:
        for layer in iter_layers(model):
            if _is_bn(layer):
                layer.momentum = bn_momentum
    return model


def get_backbone(model: keras.Model):
    return model.get_layer("backbone")


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: only the head trains."""
    get_backbone(model).trainable = False


def unfreeze_top(model: keras.Model, n: int | str) -> int:
    """Phase 2: unfreeze the top ``n`` backbone layers (or 'all'); BN layers stay frozen.
    Returns the number of backbone layers made trainable."""
    backbone = get_backbone(model)
    layers = backbone.layers
    k = len(layers) if n == "all" else max(0, min(int(n), len(layers)))
    backbone.trainable = True
    count = 0
    for i, layer in enumerate(layers):
        layer.trainable = i >= len(layers) - k
        if layer.trainable and not any(_is_bn(sub) for sub in iter_layers(layer)):
            count += 1
        for sub in iter_layers(layer):
            if _is_bn(sub):
                sub.trainable = False
    return count

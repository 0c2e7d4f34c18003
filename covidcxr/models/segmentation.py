"""Segmentation and multi-task models, written in Keras 3 layers (any backend).

Names (listed in ``covidcxr.models.catalog``), all resolved by ``seg_spec``:

- ``unet``: the classic encoder-decoder from scratch (``depth``, ``base_filters``);
- ``unet_<backbone>``, ``unetpp_<backbone>``, ``deeplabv3plus_<backbone>``: a registry
  backbone as encoder, tapped at the registry's skip layers (high to low resolution);
- ``setr_<backbone>``: a ViT token encoder (``dinov2_*``, ``rad_dino``, ``medsiglip``,
  ``vit_b16``, ``clip_vit_b16``): the patch tokens, reshaped to a ``g x g`` map, feed a light
  SETR-PUP decoder (Zheng et al. 2021: progressive bilinear 2x up-sampling + conv-BN-ReLU).
  ViTs have one resolution and no skip layers, so they cannot be U-Net encoders; the image
  size must be a multiple of the patch size (14 or 16).

Every builder returns an uncompiled model whose ``mask`` output is a one-channel
sigmoid at the input resolution; with ``num_classes`` the encoder bottleneck also
feeds a ``label`` softmax branch (multi-task). The encoder of a backbone model is
the nested sub-model ``backbone`` so the two-phase schedule can freeze it.

DeepLabV3+ is written here rather than taken from keras-hub: keras-hub's
``DeepLabV3ImageSegmenter`` wants a keras-hub backbone with a ``pyramid_outputs``
map, which the ``keras.applications`` encoders in our registry do not have. The
ASPP runs on the stride-16 skip (the last registry skip), as in the reference
Keras example, with the stride-4 skip as the low-level feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from covidcxr.errors import ConfigError
from covidcxr.models.catalog import SEG_BACKBONES, SEG_KINDS, TOKEN_BACKBONES, TOKEN_KIND, seg_arch_names
from covidcxr.models.layers import BackboneInput, gray_input
from covidcxr.models.classifier import _is_bn, iter_layers
from covidcxr.models.registry import ArchSpec, build_backbone, get_spec
from covidcxr.models.tokens import (TOKEN_CONSTRUCTORS, PatchTokensToMap, call_encoder, is_token_encoder, patch_size_of,
                                    siglip_backbone_model, siglip_encoder_of)



@dataclass(frozen=True)
class SegSpec:
    name: str
    kind: str                      # unet | unetpp | deeplabv3plus
    backbone: ArchSpec | None      # None: plain U-Net from scratch
    normalization: str
    size_multiple: int

    @property
    def min_size(self) -> int:
        return self.size_multiple

    @property
    def source(self) -> str:
        return "covidcxr" if self.backbone is None else f"covidcxr {self.kind} on {self.backbone.source}"


def _token_seg_spec(name: str, kind: str, bb: str) -> SegSpec:
    """``setr_<vit>``; a ViT named with a skip-based decoder is refused with the name to use."""
    if kind != TOKEN_KIND:
        raise ConfigError(f"{bb} is a ViT token encoder: it has one resolution and no skip layers, so it cannot be "
                          f"a {kind} encoder. Use {TOKEN_KIND}_{bb} (patch tokens + progressive up-sampling decoder).")
    if bb not in TOKEN_BACKBONES:
        raise ConfigError(f"{name}: {TOKEN_KIND}_ needs a ViT token encoder; choose from {', '.join(TOKEN_BACKBONES)} "
                          f"(CNN encoders go with unet_/unetpp_/deeplabv3plus_).")
    spec = get_spec(bb)
    return SegSpec(name, TOKEN_KIND, spec, spec.normalization, int(spec.hub_config.get("patch_size", 16)))


def seg_spec(name: str) -> SegSpec:
    if name == "unet":
        return SegSpec("unet", "unet", None, "unit", 16)
    kind, _, bb = name.partition("_")
    if kind not in SEG_KINDS + (TOKEN_KIND,) or not bb:
        raise ConfigError(f"unknown segmentation architecture '{name}'. Use unet, or unet_/unetpp_/"
                          f"deeplabv3plus_ + a backbone, e.g. {', '.join(seg_arch_names()[1:5])}..., or "
                          f"{TOKEN_KIND}_ + a ViT ({', '.join(TOKEN_BACKBONES)})")
    if kind == TOKEN_KIND or bb in TOKEN_BACKBONES:
        return _token_seg_spec(name, kind, bb)
    spec = get_spec(bb)
    if len(spec.skips) < 3:
        raise ConfigError(f"{bb} has no skip layers in the registry, so it cannot be a {kind} encoder; "
                          f"backbones with skips: {', '.join(SEG_BACKBONES)}")
    return SegSpec(name, kind, spec, spec.normalization, 32)


def conv_block(x, filters: int, name: str, dropout: float = 0.0):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    if dropout:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_drop")(x)
    return x


def _up_to(x, size: int, name: str):
    """Upsample x (bilinear) to spatial side ``size``."""
    f = size // x.shape[1]
    return x if f == 1 else layers.UpSampling2D(f, interpolation="bilinear", name=name)(x)


def _heads(inputs, features, bottleneck, num_classes, dropout, name):
    mask = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(features)
    if not num_classes:
        return keras.Model(inputs, mask, name=name)
    z = layers.GlobalAveragePooling2D(name="cls_gap")(bottleneck)
    z = layers.BatchNormalization(name="cls_bn")(z)
    z = layers.Dropout(dropout, name="cls_dropout")(z)
    label = layers.Dense(num_classes, activation="softmax", dtype="float32", name="label")(z)
    return keras.Model(inputs, {"label": label, "mask": mask}, name=name)


def build_unet(image_size: int, depth: int = 4, base_filters: int = 32, num_classes: int | None = None,
               dropout: float = 0.3) -> keras.Model:
    """Classic U-Net (Ronneberger et al. 2015) with BN, from scratch."""
    if image_size % (2 ** depth):
        raise ConfigError(f"--image-size {image_size} must be a multiple of {2 ** depth} for a depth-{depth} U-Net.")
    inputs = gray_input(image_size)
    x, skips = BackboneInput("unit", channels=1, name="preprocess")(inputs), []
    for d in range(depth):
        x = conv_block(x, base_filters * 2 ** d, f"enc{d}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{d}")(x)
    x = bottleneck = conv_block(x, base_filters * 2 ** depth, "bottleneck", dropout=0.1)
    for d in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2 ** d, 2, strides=2, padding="same", name=f"up{d}")(x)
        x = layers.Concatenate(name=f"cat{d}")([x, skips[d]])
        x = conv_block(x, base_filters * 2 ** d, f"dec{d}")
    return _heads(inputs, x, bottleneck, num_classes, dropout, "unet")


def _encoder(spec: ArchSpec, image_size: int, weights):
    """The registry backbone as one nested model with outputs [skips..., bottleneck]."""
    bb = build_backbone(spec, image_size, weights)
    names = {layer.name for layer in bb.layers}
    missing = [s for s in spec.skips if s not in names]
    if missing:
        raise ConfigError(f"{spec.name}: registry skip layer(s) {missing} are not in the built backbone; "
                          f"the registry entry needs updating for this Keras version.")
    outs = [bb.get_layer(s).output for s in spec.skips] + [bb.output]
    return keras.Model(bb.inputs, outs, name="backbone")


def _encode(spec: ArchSpec, image_size: int, weights):
    """(gray model input, encoder features [skips..., bottleneck]) for a registry backbone."""
    inputs = gray_input(image_size)
    x = BackboneInput(spec.normalization, name="preprocess")(inputs)
    enc = _encoder(spec, image_size, weights)
    return inputs, (enc(x, training=False) if weights is not None else enc(x))


def build_unet_backbone(spec: ArchSpec, image_size: int, weights=None, decoder_filters=(256, 128, 64, 32, 16),
                        num_classes: int | None = None, dropout: float = 0.3) -> keras.Model:
    inputs, feats = _encode(spec, image_size, weights)
    *skips, x = feats
    bottleneck = x
    for i, skip in enumerate(reversed(skips)):
        x = _up_to(x, skip.shape[1], f"dec{i}_up")
        x = layers.Concatenate(name=f"dec{i}_cat")([x, skip])
        x = conv_block(x, decoder_filters[min(i, len(decoder_filters) - 1)], f"dec{i}")
    x = _up_to(x, image_size, "dec_final_up")
    x = conv_block(x, decoder_filters[-1], "dec_final")
    return _heads(inputs, x, bottleneck, num_classes, dropout, f"unet_{spec.name}")


def build_unetpp(spec: ArchSpec, image_size: int, weights=None, filters=(32, 64, 128, 256, 512),
                 deep_supervision: bool = False, num_classes: int | None = None, dropout: float = 0.3) -> keras.Model:
    """U-Net++ (Zhou et al. 2018): nested dense skip paths X[i][j] = conv(X[i][0..j-1], up(X[i+1][j-1])).
    ``deep_supervision``: the mask is the mean of the 1x1 heads on X[0][1..n]."""
    inputs, feats = _encode(spec, image_size, weights)
    n = len(feats) - 1
    X = [[f] for f in feats]  # X[i][0]: encoder level i (high to low resolution)
    for j in range(1, n + 1):
        for i in range(0, n - j + 1):
            up = _up_to(X[i + 1][j - 1], X[i][0].shape[1], f"x{i}{j}_up")
            x = layers.Concatenate(name=f"x{i}{j}_cat")(X[i][:j] + [up])
            X[i].append(conv_block(x, filters[min(i, len(filters) - 1)], f"x{i}{j}"))
    if deep_supervision:
        heads = [layers.Conv2D(1, 1, name=f"ds{j}")(_up_to(X[0][j], image_size, f"ds{j}_up")) for j in range(1, n + 1)]
        top = layers.Average(name="ds_mean")(heads)
        mask_in = top
        mask = layers.Activation("sigmoid", dtype="float32", name="mask")(mask_in)
        model_mask = mask
    else:
        x = _up_to(X[0][n], image_size, "final_up")
        x = conv_block(x, filters[0] // 2, "final")
        model_mask = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    if not num_classes:
        return keras.Model(inputs, model_mask, name=f"unetpp_{spec.name}")
    z = layers.GlobalAveragePooling2D(name="cls_gap")(feats[-1])
    z = layers.BatchNormalization(name="cls_bn")(z)
    z = layers.Dropout(dropout, name="cls_dropout")(z)
    label = layers.Dense(num_classes, activation="softmax", dtype="float32", name="label")(z)
    return keras.Model(inputs, {"label": label, "mask": model_mask}, name=f"unetpp_{spec.name}")


def _conv_bn(x, filters, kernel, name, rate=1):
    x = layers.Conv2D(filters, kernel, padding="same", dilation_rate=rate, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build_deeplabv3plus(spec: ArchSpec, image_size: int, weights=None, aspp_filters: int = 256,
                        rates=(6, 12, 18), num_classes: int | None = None, dropout: float = 0.3) -> keras.Model:
    """DeepLabV3+ (Chen et al. 2018): ASPP on the stride-16 feature, decoder with the stride-4 skip."""
    inputs, feats = _encode(spec, image_size, weights)
    *skips, bottleneck = feats
    high = skips[-1]          # stride 16
    low = skips[1] if len(skips) > 2 else skips[0]  # stride 4
    side = high.shape[1]
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(high)
    pooled = _conv_bn(pooled, aspp_filters, 1, "aspp_pool")
    pooled = layers.UpSampling2D(side, interpolation="bilinear", name="aspp_pool_up")(pooled)
    branches = [pooled, _conv_bn(high, aspp_filters, 1, "aspp_1x1")]
    branches += [_conv_bn(high, aspp_filters, 3, f"aspp_r{r}", rate=r) for r in rates]
    x = layers.Concatenate(name="aspp_cat")(branches)
    x = _conv_bn(x, aspp_filters, 1, "aspp_out")
    x = layers.Dropout(0.1, name="aspp_drop")(x)
    x = _up_to(x, low.shape[1], "dec_up")
    lowp = _conv_bn(low, 48, 1, "low_proj")
    x = layers.Concatenate(name="dec_cat")([x, lowp])
    x = _conv_bn(x, aspp_filters, 3, "dec1")
    x = _conv_bn(x, aspp_filters, 3, "dec2")
    x = _up_to(x, image_size, "final_up")
    return _heads(inputs, x, bottleneck, num_classes, dropout, f"deeplabv3plus_{spec.name}")


def build_setr(spec: ArchSpec, image_size: int, weights=None, decoder_filters=(256, 128, 64, 32),
               num_classes: int | None = None, dropout: float = 0.3) -> keras.Model:
    """SETR-PUP on a ViT token encoder: tokens (class/register tokens dropped) -> ``[g, g, D]`` map ->
    one (bilinear 2x up + conv-BN-ReLU) stage per ``decoder_filters`` entry -> resize to the input."""
    inputs = gray_input(image_size)
    x = BackboneInput(spec.normalization, name="preprocess")(inputs)
    enc, grid = token_encoder(spec, image_size, weights)
    tokens = call_encoder(enc, x, pretrained=weights is not None)
    x = bottleneck = PatchTokensToMap(grid, name="token_map")(tokens)
    for i, filters in enumerate(decoder_filters):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"pup{i}_up")(x)
        x = _conv_bn(x, filters, 3, f"pup{i}")
    if x.shape[1] != image_size:
        x = layers.Resizing(image_size, image_size, interpolation="bilinear", name="pup_resize")(x)
    return _heads(inputs, x, bottleneck, num_classes, dropout, f"{TOKEN_KIND}_{spec.name}")


def build_segmenter(name: str, image_size: int, weights=None, num_classes: int | None = None,
                    dropout: float = 0.3, bn_momentum: float | None = None, **kw) -> keras.Model:
    """Any segmentation name -> uncompiled model (``num_classes``: multi-task)."""
    s = seg_spec(name)
    if image_size % s.size_multiple:
        raise ConfigError(f"--image-size {image_size} does not suit {name}: use a multiple of {s.size_multiple}.")
    if s.backbone is None:
        if weights not in (None, "none"):
            raise ConfigError("the plain unet trains from scratch; --weights applies to unet_<backbone> models.")
        model = build_unet(image_size, num_classes=num_classes, dropout=dropout, **kw)
    else:
        builder = {"unet": build_unet_backbone, "unetpp": build_unetpp, "deeplabv3plus": build_deeplabv3plus,
                   TOKEN_KIND: build_setr}[s.kind]
        model = builder(s.backbone, image_size, weights, num_classes=num_classes, dropout=dropout, **kw)
    if bn_momentum is not None:
        for layer in iter_layers(model):
            if _is_bn(layer):
                layer.momentum = bn_momentum
    return model


def token_encoder(spec, image_size: int, weights) -> tuple[keras.Model, int]:
    """(nested sub-model ``backbone``: ``[B, S, S, 3]`` -> tokens ``[B, L, D]``, patch grid side g)."""
    if not is_token_encoder(spec):
        raise ConfigError(f"{spec.name} is not a ViT token encoder; token encoders: "
                          f"{', '.join(TOKEN_CONSTRUCTORS)} backbones.")
    patch = patch_size_of(spec)
    if image_size % patch:
        raise ConfigError(f"--image-size {image_size} does not suit {spec.name}: its patches are {patch} px, so use "
                          f"a multiple of {patch} (e.g. {max(2, image_size // patch) * patch}).")
    bb = build_backbone(spec, image_size, weights)
    if spec.constructor == "SigLIPVisionEncoder":
        enc = siglip_encoder_of(bb)
        enc.head.trainable = False  # the pooling head is unused on patch tokens: keep it out of the optimiser
        model = siglip_backbone_model(enc, image_size, pooled=False, name="backbone")
    else:
        if len(bb.outputs) != 1:
            raise ConfigError(f"{spec.name}: the built backbone has {len(bb.outputs)} outputs; a token encoder "
                              f"must return one token sequence.")
        model = bb
        model.name = "backbone"
    grid = image_size // patch
    seq = model.output.shape[1]
    if seq is not None and seq < grid * grid:
        raise ConfigError(f"{spec.name} returns {seq} tokens at {image_size} px, fewer than its {grid}x{grid} "
                          f"patch grid; the registry entry's patch size is wrong.")
    return model, grid

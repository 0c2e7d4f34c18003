"""ViT token encoders as covidcxr backbones: SigLIP's image tower, and patch tokens as a feature map.

Importing this module registers the layers below with Keras, so a saved model that uses them
loads: import it before ``keras.saving.load_model`` of a rad_dino / medsiglip / ``setr_*`` model
(``covidcxr.inference.load_keras`` does).

- ``SigLIPTokens`` runs a keras-hub ``SigLIPVisionEncoder`` and returns either its patch
  tokens (after the post layer norm, before pooling) or its pooled image embedding (the
  multi-head attention pooling "MAP" head) as a one-token sequence ``[B, 1, D]``. The
  one-token form lets ``build_classifier``'s ``GlobalAveragePooling1D`` return exactly the
  SigLIP image embedding, which is what MedSigLIP's authors probe linearly; the token form
  feeds segmentation decoders. The encoder is kept whole inside the layer so the model
  serialises through keras-hub's registered ``SigLIPVisionEncoder``.
- ``PatchTokensToMap`` drops the class/register tokens that ViTs put before the patch
  tokens and reshapes ``[B, N, D]`` to ``[B, g, g, D]``.
"""
from __future__ import annotations

import keras
from keras import ops

from covidcxr.errors import ConfigError

# Registry constructors whose output is a token sequence [B, L, D] (SigLIP: via SigLIPTokens).
TOKEN_CONSTRUCTORS = ("DINOV2Backbone", "ViTBackbone", "CLIPVisionEncoder", "SigLIPVisionEncoder")


def is_token_encoder(spec) -> bool:
    return spec.source == "keras-hub" and spec.constructor in TOKEN_CONSTRUCTORS


def patch_size_of(spec) -> int:
    return int(spec.hub_config.get("patch_size", spec.size_multiple))


@keras.saving.register_keras_serializable(package="covidcxr")
class SigLIPTokens(keras.layers.Layer):
    """A ``SigLIPVisionEncoder`` as a layer: ``pooled=False`` -> patch tokens ``[B, N, D]``;
    ``pooled=True`` -> the MAP-pooled image embedding as ``[B, 1, D]``."""

    def __init__(self, encoder, pooled: bool = True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(encoder, dict):
            encoder = keras.layers.deserialize(encoder)
        self.encoder = encoder
        self.pooled = bool(pooled)

    def build(self, input_shape):
        self.built = True  # the encoder arrives built (keras-hub builds its functional graph)

    def call(self, images, training=None):
        enc = self.encoder
        x = enc.embedding(images, training=training)
        for block in enc.encoder_layers:
            x = block(x, training=training)
        x = enc.post_layer_norm(x)
        if not self.pooled:
            return x
        return ops.expand_dims(enc.head(x, training=training), 1)

    def compute_output_shape(self, input_shape):
        n = (int(input_shape[1]) // int(self.encoder.patch_size)) ** 2 if input_shape[1] else None
        return (input_shape[0], 1 if self.pooled else n, int(self.encoder.hidden_dim))

    def get_config(self):
        return {**super().get_config(), "encoder": keras.layers.serialize(self.encoder), "pooled": self.pooled}


@keras.saving.register_keras_serializable(package="covidcxr")
class PatchTokensToMap(keras.layers.Layer):
    """``[B, L, D]`` (any class/register tokens first) -> the last ``grid**2`` tokens as ``[B, g, g, D]``."""

    def __init__(self, grid: int, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)

    def call(self, tokens):
        n = self.grid * self.grid
        patches = tokens[:, -n:, :]
        return ops.reshape(patches, (-1, self.grid, self.grid, ops.shape(tokens)[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.grid, self.grid, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "grid": self.grid}


def siglip_backbone_model(encoder, image_size: int, pooled: bool, name: str | None = None) -> keras.Model:
    """Functional model ``[B, S, S, 3]`` -> SigLIP tokens (``pooled``: ``[B, 1, D]``) around ``encoder``."""
    inputs = keras.Input((image_size, image_size, 3), name="images")
    out = SigLIPTokens(encoder, pooled=pooled, name="siglip_tokens")(inputs)
    return keras.Model(inputs, out, name=name or encoder.name)


def call_encoder(encoder, x, pretrained: bool):
    """``encoder(x)`` as the builders call it: keras-hub backbones declare a dict input ``{"images": ...}``
    (passing it avoids Keras' input-structure warning); pretrained encoders run in inference mode."""
    arg = {"images": x} if isinstance(getattr(encoder, "_inputs_struct", None), dict) else x
    return encoder(arg, training=False) if pretrained else encoder(arg)


def as_registry_backbone(spec, model, image_size: int, pretrained: bool = False):
    """What ``build_backbone`` returns for ``model``: a SigLIP image tower becomes the pooled one-token
    model (so ``build_classifier`` pools to the SigLIP embedding); a pretrained DINOv2 gets its position
    embeddings frozen (``freeze_position_embeddings``); every other backbone is unchanged."""
    if spec.constructor == "SigLIPVisionEncoder":
        return siglip_backbone_model(model, image_size, pooled=True, name=spec.name)
    if spec.constructor == "DINOV2Backbone" and pretrained:
        freeze_position_embeddings(model)
    return model


def has_interpolated_positions(layer) -> bool:
    """A keras-hub DINOv2 backbone: its embeddings hold interpolated position embeddings."""
    return getattr(getattr(layer, "embeddings", None), "interpolated_position_embeddings", None) is not None


def freeze_position_embeddings(dinov2) -> None:
    """Keep a DINOv2 backbone's (interpolated) position embeddings out of fine-tuning.

    keras-hub 0.32 saves fine-tuned position embeddings only when the *signed* sum of their
    change exceeds epsilon, and then resamples them to the native grid (518 px) and back on
    load: a fine-tuned checkpoint (``best.keras``) would predict differently from the model
    that was validated. Frozen, they round-trip exactly. The flag is per variable: setting
    ``layer.trainable = True`` on the backbone (``unfreeze_top``) turns it back on, and it is
    not saved, so call this again after unfreezing and after reloading a model to train it."""
    emb = getattr(getattr(dinov2, "embeddings", None), "interpolated_position_embeddings", None)
    if emb is not None:
        emb.trainable = False


def siglip_encoder_of(backbone) -> "keras.Model":
    """The ``SigLIPVisionEncoder`` inside a registry SigLIP backbone (or the encoder itself)."""
    import keras_hub  # heavy; already imported wherever a SigLIP tower exists (it was built from it)

    if isinstance(backbone, keras_hub.models.SigLIPVisionEncoder):
        return backbone
    for layer in backbone.layers:
        if isinstance(layer, SigLIPTokens):
            return layer.encoder
    raise ConfigError(f"{backbone.name} holds no SigLIP image tower.")

"""Grad-CAM for the registry's classifiers, nested backbones and keras-hub transformers included.

Transfer-learning models nest the backbone as one layer, so the textbook
``keras.Model(model.inputs, model.get_layer(conv).output)`` fails with
"graph disconnected". Here the model is split instead: a feature model built
*inside* the backbone's own graph returns (target activations, backbone output),
and the outer layers before and after the backbone are applied in order, the
final softmax Dense as logits. Token outputs of ViT-style backbones ([B, N, D],
class token first) are reshaped to their patch grid.
"""
from __future__ import annotations

import math

import keras
import numpy as np

from covidcxr.errors import CovidCXRError


class GradCAMError(CovidCXRError):
    pass


def _rank(layer) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return 0


def _find_backbone(model):
    names = [layer.name for layer in model.layers]
    if "backbone" in names:
        return model.get_layer("backbone")
    subs = [layer for layer in model.layers if isinstance(layer, keras.Model) and _rank(layer) in (3, 4)]
    return subs[-1] if subs else None


def candidate_layers(model, n: int = 8) -> list[str]:
    """Names of the last layers with spatial (or token) outputs, for error messages and --gradcam-layer."""
    bb = _find_backbone(model) or model
    names = [layer.name for layer in bb.layers if _rank(layer) in (3, 4) and not isinstance(layer, keras.layers.InputLayer)]
    return names[-n:]


class GradCAM:
    """``GradCAM(model, layer=None).heatmaps(x, class_index=None) -> [B, h, w] in [0, 1]``.

    ``layer``: a layer name inside the backbone (or the model, when not nested);
    default: the backbone's output (its last feature block)."""

    def __init__(self, model, layer: str | None = None):
        self.model = model
        bb = _find_backbone(model)
        last = model.layers[-1]
        if not isinstance(last, keras.layers.Dense):
            raise GradCAMError(f"Grad-CAM needs a model ending in a Dense classification layer; "
                               f"{model.name} ends in {type(last).__name__} '{last.name}'.")
        self.dense = last
        scope = bb if bb is not None else model
        if layer is None:
            target = scope.layers[-1] if bb is not None else self._last_spatial(model)
        else:
            try:
                target = scope.get_layer(layer)
            except ValueError:
                raise GradCAMError(f"Grad-CAM layer '{layer}' not found in {scope.name}; last candidates: "
                                   f"{', '.join(candidate_layers(model))}") from None
        if _rank(target) not in (3, 4):
            raise GradCAMError(f"Grad-CAM layer '{target.name}' has output shape {target.output.shape}; "
                               f"it needs a feature map [B, H, W, C] or tokens [B, N, D]. Candidates: "
                               f"{', '.join(candidate_layers(model))}")
        self.layer_name = target.name
        if bb is not None:
            self.features = keras.Model(bb.inputs, [target.output, bb.output])
            i = model.layers.index(bb)
            self.before = [lay for lay in model.layers[:i] if not isinstance(lay, keras.layers.InputLayer)]
            self.after = [lay for lay in model.layers[i + 1:-1]]
        else:
            self.features = keras.Model(model.inputs, [target.output, last.input])
            self.before, self.after = [], []

    @staticmethod
    def _last_spatial(model):
        for layer in reversed(model.layers):
            if _rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer):
                return layer
        raise GradCAMError(f"no layer with a spatial output in {model.name}; pass a layer name.")

    def _forward(self, x):
        import tensorflow as tf

        for layer in self.before:
            x = layer(x, training=False)
        acts, h = self.features(x, training=False)
        for layer in self.after:
            h = layer(h, training=False)
        logits = tf.matmul(tf.cast(h, tf.float32), tf.cast(self.dense.kernel, tf.float32))
        if self.dense.use_bias:
            logits = logits + tf.cast(self.dense.bias, tf.float32)
        return acts, logits

    def heatmaps(self, x, class_index=None) -> tuple[np.ndarray, np.ndarray]:
        """(heatmaps [B, h, w] in [0, 1], probabilities [B, K]). ``class_index``: int, array or None
        (the predicted class)."""
        import tensorflow as tf

        x = tf.convert_to_tensor(x, tf.float32)
        with tf.GradientTape() as tape:
            acts, logits = self._forward(x)
            acts = tf.cast(acts, tf.float32)
            tape.watch(acts)
            probs = tf.nn.softmax(logits)
            if class_index is None:
                idx = tf.argmax(logits, axis=-1, output_type=tf.int32)
            else:
                idx = tf.broadcast_to(tf.constant(class_index, tf.int32), [tf.shape(logits)[0]])
            score = tf.gather(logits, idx, axis=1, batch_dims=1)
        grads = tape.gradient(score, acts)
        a, g = acts.numpy(), grads.numpy()
        if a.ndim == 3:  # tokens [B, N, D] -> patch grid
            a, g = _tokens_to_grid(a), _tokens_to_grid(g)
        weights = g.mean(axis=(1, 2), keepdims=True)
        cam = np.maximum((weights * a).sum(axis=-1), 0)
        peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
        cam = np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)
        return cam.astype(np.float32), probs.numpy()


def _tokens_to_grid(t: np.ndarray) -> np.ndarray:
    n = t.shape[1]
    for extra in (0, 1, 2, 4, 5, 8):  # class / register / distillation tokens lead the sequence
        g = math.isqrt(n - extra)
        if g * g == n - extra and g > 0:
            return t[:, extra:].reshape(t.shape[0], g, g, t.shape[2])
    raise GradCAMError(f"cannot lay {n} tokens on a square patch grid")


def overlay(gray01: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Grayscale image [H, W] in [0, 1] + heatmap [h, w] in [0, 1] -> RGB uint8 [H, W, 3] (jet)."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = gray01.shape[:2]
    cam_img = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    heat = colormaps["jet"](np.asarray(cam_img, np.float32) / 255.0)[..., :3]
    base = np.repeat(np.clip(gray01, 0, 1)[..., None], 3, axis=-1)
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255 + 0.5).astype(np.uint8)

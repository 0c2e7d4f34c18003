"""The SavedModel's ``serving_default`` signatures: encoded image bytes in, the model's answer out.

Inside the graph each image is decoded, resized and contrast-enhanced exactly as the host
side does it for training (covidcxr/data/tfgraph.py mirrors covidcxr/data/preprocess.py), and
fed to the model as uint8-range grayscale; the model normalises for its backbone itself.

- classifier: ``image_bytes`` [batch] -> ``probabilities``, ``label``; a classifier trained on
  the data's own lung masks takes ``lung_mask_bytes`` too; one trained on predicted masks
  runs its embedded lung segmenter first;
- segmenter / multi-task: -> ``mask`` (model resolution), ``mask_png`` (a PNG at each input's
  own size), ``height``, ``width`` (+ ``probabilities``, ``label``).

Two more endpoints split that in two, for the export check and for clients that want to verify
their own preprocessing: ``pixels`` (the same inputs -> ``pixels``, the uint8 model input;
``image_pixels`` before a lung crop and ``crop_mask``) and ``from_pixels`` (``pixels`` float32
[B, S, S, 1] in 0..255 -> the model's outputs).
"""
from __future__ import annotations

import functools

import tensorflow as tf

from covidcxr.artifacts import LungCrop, ModelCard
from covidcxr.data import tfgraph as G
from covidcxr.tasks import get_task

# The endpoints have no Python control flow on tensors, so AutoGraph has nothing to convert; left on,
# it once called the wrong one of two same-named local functions ("tf__serve() missing
# 'lung_mask_bytes'") and the wrong preprocess helper. Traced as plain Python instead.
_graph = functools.partial(tf.function, autograph=False)


def _images(image_bytes, size: int, contrast: str):
    """Batch of bytes -> (uint8 [B, S, S, 1] model input pixels, heights [B], widths [B])."""
    def one(b):
        g16 = G.decode_g16(b)
        pixels = G.contrast_g16(G.resize_g16(g16, size), size, contrast)
        return pixels, tf.shape(g16)[0], tf.shape(g16)[1]

    return tf.map_fn(one, image_bytes, fn_output_signature=(
        tf.TensorSpec([size, size, 1], tf.uint8), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)))


def _probs(model, x, classes):
    probs = tf.cast(model(x, training=False), tf.float32)
    return {"probabilities": probs, "label": tf.gather(classes, tf.argmax(probs, axis=-1))}


def _mask_output(out, multitask: bool):
    return tf.cast(out["mask"] if multitask or isinstance(out, dict) else out, tf.float32)


def classifier_fns(model, card: ModelCard, segmenter=None) -> dict:
    """The classifier's endpoints: ``serving_default`` (bytes -> probabilities, label),
    ``pixels`` (bytes -> the uint8 model input, before and after the lung crop) and
    ``from_pixels`` (uint8-range float32 input -> probabilities, label): the export check compares
    the pixels with the host's and the outputs on the same pixels, each on its own.
    ``segmenter``: (Keras model, its ModelCard) for a classifier trained on predicted lung masks."""
    size, contrast, classes = card.image_size, card.contrast, tf.constant(card.classes)
    spec = tf.TensorSpec([None], tf.string, name="image_bytes")
    pix_spec = tf.TensorSpec([None, size, size, 1], tf.float32, name="pixels")

    def crop_mask(image_bytes, lung_mask_bytes=None):
        if card.lung_crop is LungCrop.GIVEN:
            return tf.map_fn(lambda b: tf.cast(G.resize_mask(G.decode_mask(b), size), tf.uint8), lung_mask_bytes,
                             fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8))
        seg, seg_card = segmenter
        sx, _, _ = _images(image_bytes, seg_card.image_size, seg_card.contrast)
        probs = _mask_output(seg(tf.cast(sx, tf.float32), training=False), False)
        return tf.cast(G.mask_from_probs(probs, size), tf.uint8)

    def pixels_of(image_bytes, lung_mask_bytes=None):
        x, _, _ = _images(image_bytes, size, contrast)
        if card.lung_crop is LungCrop.NONE:
            return {"pixels": x, "image_pixels": x}
        mask = crop_mask(image_bytes, lung_mask_bytes)
        return {"pixels": x * mask, "image_pixels": x, "crop_mask": mask}

    @_graph(input_signature=[pix_spec])
    def from_pixels(pixels):
        return _probs(model, pixels, classes)

    if card.lung_crop is LungCrop.GIVEN:
        mask_spec = tf.TensorSpec([None], tf.string, name="lung_mask_bytes")

        @_graph(input_signature=[spec, mask_spec])
        def pixels_given(image_bytes, lung_mask_bytes):
            return pixels_of(image_bytes, lung_mask_bytes)

        @_graph(input_signature=[spec, mask_spec])
        def serve_given(image_bytes, lung_mask_bytes):
            return _probs(model, tf.cast(pixels_of(image_bytes, lung_mask_bytes)["pixels"], tf.float32), classes)

        pixels, serve = pixels_given, serve_given
    else:
        @_graph(input_signature=[spec])
        def pixels_plain(image_bytes):
            return pixels_of(image_bytes)

        @_graph(input_signature=[spec])
        def serve_plain(image_bytes):
            return _probs(model, tf.cast(pixels_of(image_bytes)["pixels"], tf.float32), classes)

        pixels, serve = pixels_plain, serve_plain
    return {"serving_default": serve, "pixels": pixels, "from_pixels": from_pixels}


def segmenter_fns(model, card: ModelCard) -> dict:
    """A segmenter's or multi-task model's endpoints, as classifier_fns; ``serving_default`` also
    gives ``mask_png``, the mask at each input's own size."""
    size, contrast, classes = card.image_size, card.contrast, tf.constant(card.classes)
    multitask = get_task(card.task).multi_output
    spec = tf.TensorSpec([None], tf.string, name="image_bytes")

    def outputs(x):
        out = model(x, training=False)
        res = {"mask": _mask_output(out, multitask)[..., 0]}
        if multitask:
            res.update(_probs(lambda *a, **k: out["label"], x, classes))
        return res

    def png(args):
        m, hh, ww = args
        full = G.mask_from_probs(m[None, ..., None], tf.stack([hh, ww]))[0]
        return tf.io.encode_png(tf.cast(full, tf.uint8) * 255)

    @_graph(input_signature=[spec])
    def serve(image_bytes):
        x, h, w = _images(image_bytes, size, contrast)
        res = outputs(tf.cast(x, tf.float32))
        res.update(height=h, width=w, mask_png=tf.map_fn(png, (res["mask"], h, w),
                                                         fn_output_signature=tf.TensorSpec([], tf.string)))
        return res

    @_graph(input_signature=[spec])
    def pixels(image_bytes):
        x, _, _ = _images(image_bytes, size, contrast)
        return {"pixels": x, "image_pixels": x}

    @_graph(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name="pixels")])
    def from_pixels(pixels):
        return outputs(pixels)

    return {"serving_default": serve, "pixels": pixels, "from_pixels": from_pixels}

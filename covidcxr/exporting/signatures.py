"""The SavedModel's ``serving_default`` signatures: encoded image bytes in, the model's answer out.

Inside the graph each image is decoded, resized and contrast-enhanced exactly as the host
side does it for training (covidcxr/data/tfgraph.py mirrors covidcxr/data/preprocess.py), and
fed to the model as uint8-range grayscale; the model normalises for its backbone itself.

- classifier: ``image_bytes`` [batch] -> ``probabilities``, ``label``; a classifier trained on
  the data's own lung masks takes ``lung_mask_bytes`` too; one trained on predicted masks
  runs its embedded lung segmenter first;
- segmenter / multi-task: -> ``mask`` (model resolution), ``mask_png`` (a PNG at each input's
  own size), ``height``, ``width`` (+ ``probabilities``, ``label``).
"""
from __future__ import annotations

import tensorflow as tf

from covidcxr.artifacts import ModelCard
from covidcxr.data import tfgraph as G


def _images(image_bytes, size: int, contrast: str):
    """Batch of bytes -> (float32 [B, S, S, 1] model input, heights [B], widths [B])."""
    def one(b):
        img = G.decode_bytes(b)
        return tf.cast(G.prepare(img, size, contrast), tf.float32), tf.shape(img)[0], tf.shape(img)[1]

    return tf.map_fn(one, image_bytes, fn_output_signature=(
        tf.TensorSpec([size, size, 1], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)))


def _probs(model, x, classes):
    probs = tf.cast(model(x, training=False), tf.float32)
    return {"probabilities": probs, "label": tf.gather(classes, tf.argmax(probs, axis=-1))}


def classifier_fn(model, card: ModelCard, segmenter=None):
    """``segmenter``: (Keras model, its ModelCard) for a classifier trained on predicted lung masks."""
    size, contrast, classes = card.image_size, card.contrast, tf.constant(card.classes)
    spec = tf.TensorSpec([None], tf.string, name="image_bytes")
    if card.lung_crop == "given":
        @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.string, name="lung_mask_bytes")])
        def serve_given(image_bytes, lung_mask_bytes):
            x, _, _ = _images(image_bytes, size, contrast)
            masks = tf.map_fn(lambda b: G.resize_mask(G.decode_mask(b), size), lung_mask_bytes,
                              fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32))
            return _probs(model, x * masks, classes)

        return serve_given
    if card.lung_crop == "model":
        seg, seg_card = segmenter

        @tf.function(input_signature=[spec])
        def serve_cropped(image_bytes):
            x, _, _ = _images(image_bytes, size, contrast)
            sx, _, _ = _images(image_bytes, seg_card.image_size, seg_card.contrast)
            out = seg(sx, training=False)
            probs = tf.cast(out["mask"] if isinstance(out, dict) else out, tf.float32)
            return _probs(model, x * G.mask_from_probs(probs, size), classes)

        return serve_cropped

    @tf.function(input_signature=[spec])
    def serve(image_bytes):
        x, _, _ = _images(image_bytes, size, contrast)
        return _probs(model, x, classes)

    return serve


def segmenter_fn(model, card: ModelCard):
    size, contrast, classes = card.image_size, card.contrast, tf.constant(card.classes)
    multitask = card.task == "multitask"

    def png(args):
        m, hh, ww = args
        full = G.mask_from_probs(m[None], tf.stack([hh, ww]))[0]
        return tf.io.encode_png(tf.cast(full, tf.uint8) * 255)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        x, h, w = _images(image_bytes, size, contrast)
        out = model(x, training=False)
        mask = tf.cast(out["mask"] if multitask else out, tf.float32)
        res = {"mask": mask[..., 0], "height": h, "width": w,
               "mask_png": tf.map_fn(png, (mask, h, w), fn_output_signature=tf.TensorSpec([], tf.string))}
        if multitask:
            res.update(_probs(lambda *a, **k: out["label"], x, classes))
        return res

    return serve

"""The frozen-encoder linear probe (``train --freeze-encoder``) on cached embeddings.

With the encoder frozen, only the head (BatchNormalization, dropout, softmax) learns, and the
encoder's pooled features of an image never change. They are computed once per (image, encoder
weights, preprocessing) into covidcxr.training.embeddings' store, so the probe's epochs, a
second probe, or a whole label-efficiency curve over the same encoder costs seconds after the
first pass. The head is trained by the same loop as everything else (phases, early stopping,
checkpoints, resume) on batches of features instead of images; there is no augmentation (the
usual linear-evaluation protocol: augmentation would change the features). The checkpoint is
the whole network, whose head shares its weights with the probe's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np

from covidcxr.training.data import Batches, RunData
from covidcxr.training.embeddings import EmbeddingCache, encoder_id


def head_model(net: keras.Model) -> keras.Model:
    """The classifier's own head layers on a feature input: training it trains ``net``'s head."""
    gap = net.get_layer("gap")
    inp = keras.Input(gap.output.shape[1:], name="features")
    out = net.get_layer("label")(net.get_layer("head_dropout")(net.get_layer("head_bn")(inp)))
    return keras.Model(inp, out, name="probe_head")


def features(net: keras.Model, data: RunData, cache_root: Path, batch_size: int, log) -> np.ndarray:
    """Pooled features [N, D] of every decoded row of ``data`` (zeros for rows that failed)."""
    extractor = keras.Model(net.input, net.get_layer("gap").output)
    ok = np.flatnonzero(data.cache.ok)
    images = data.cache.images
    # The key is the model input itself (the cached uint8 image): it covers the file, the size, the
    # contrast and any lung crop at once.
    keys = [hashlib.sha256(np.ascontiguousarray(images[i]).tobytes()).hexdigest() for i in ok]

    def compute(pos: list[int]) -> np.ndarray:
        x = np.asarray(images[ok[pos]])[..., None]
        n = len(x)
        if n < batch_size:  # one compiled shape
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
        return keras.ops.convert_to_numpy(extractor.predict_on_batch(x))[:n]

    cache = EmbeddingCache(cache_root)
    feats = cache.get(keys, encoder_id(net.get_layer("backbone")), f"gray{images.shape[1]}", compute, batch_size)
    s = cache.last_stats
    log(f"linear probe on cached embeddings: {s['hits']} of {s['unique']} images reused, {s['computed']} computed "
        f"in {s['compute_seconds']:.1f} s ({cache.folder(encoder_id(net.get_layer('backbone')), f'gray{images.shape[1]}')})")
    out = np.zeros((len(data.cache.ok), feats.shape[1]), np.float32)
    out[ok] = feats
    return out


class FeatureBatches(Batches):
    """``Batches`` over feature vectors instead of images: the same order rule (seed, epoch), class
    weights and padding; nothing to prefetch."""

    def __init__(self, data: RunData, feats: np.ndarray, rows: np.ndarray, batch_size: int, **kwargs):
        super().__init__(data, rows, batch_size, prefetch=0, **kwargs)
        self.feats = feats

    def batch(self, i: int):
        idx = self.indices(i)
        x = {"image": self.feats[idx], "class_weight": self.weights(idx), "mask_weight": np.zeros(len(idx), np.float32)}
        return x, self.onehot[np.clip(self.labels[idx], 0, None)]

"""SimCLR (Chen et al. 2020) for grayscale chest X-rays: the views, the model and the NT-Xent loss.

Two random views of each image, an encoder from the registry, global pooling and a 2-layer
projection head; each view must pick its partner out of the 2B-1 other views of the batch. Views
use augmentations that make sense for chest X-rays: random resized crops (35-100% of the area),
small rotations, brightness/contrast, Gaussian blur; no colour jitter and no flips. They are made
in ``keras.ops`` inside the compiled step, so every backend renders the same views.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from covidcxr.augment import affine_matrices, sample_affine
from covidcxr.models.classifier import iter_layers
from covidcxr.models.layers import BackboneInput
from covidcxr.models.registry import build_backbone, get_spec

LOAD_SCALE = 1.15     # images are cached this much larger than the views, so crops keep detail
BLUR_RADIUS = 4       # Gaussian taps each side: 2.7 sigma at the largest sigma
VIEW = dict(min_area=0.35, max_ratio=4 / 3, rotation_deg=10.0, brightness=0.2, contrast=0.3,
            blur_p=0.5, sigma=(0.1, 1.5))
N_PARAMS = 9          # uniform numbers drawn per view (see render_views)


def nt_xent(temperature: float = 0.1):
    """Loss on projections z [2B, d] ordered (view 1 of the batch, view 2 of the batch)."""
    def loss(y_true, z):
        z = ops.cast(z, "float32")
        z = z / ops.maximum(ops.norm(z, axis=-1, keepdims=True), 1e-12)
        n = ops.shape(z)[0]
        b = n // 2
        sim = ops.matmul(z, ops.transpose(z)) / temperature
        sim = sim - 1e9 * ops.eye(n)  # a view is not its own partner
        partner = ops.concatenate([ops.arange(b, n), ops.arange(0, b)])
        ce = keras.losses.sparse_categorical_crossentropy(partner, sim, from_logits=True)
        return ops.mean(ce) + 0.0 * ops.sum(ops.cast(y_true, "float32"))

    return loss


def load_size(image_size: int) -> int:
    """Side of the cached images for views of ``image_size`` pixels."""
    return int(round(image_size * LOAD_SCALE))


def blur(images, sigma, radius: int = BLUR_RADIUS):
    """Per-image Gaussian blur of float [B, S, S, 1] with per-image sigma [B] (pixels; 0: none).

    Separable, and written as a per-image weighted sum of 2*radius+1 shifted copies of the
    (mirror-padded) image, so each image gets its own kernel with plain elementwise ops: any
    backend, any batch size, nothing but the batch dimension dynamic."""
    size = images.shape[1]
    taps = ops.cast(ops.arange(-radius, radius + 1), "float32")
    s = ops.maximum(ops.cast(sigma, "float32"), 1e-3)[:, None]
    k = ops.exp(-ops.square(taps)[None, :] / (2.0 * ops.square(s)))
    k = k / ops.sum(k, axis=1, keepdims=True)                        # [B, 2r+1]; sigma 0: a delta
    x = ops.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="symmetric")
    rows = sum(x[:, :, t:t + size, :] * ops.reshape(k[:, t], (-1, 1, 1, 1)) for t in range(2 * radius + 1))
    return sum(rows[:, t:t + size, :, :] * ops.reshape(k[:, t], (-1, 1, 1, 1)) for t in range(2 * radius + 1))


def crop_matrices(u, load: int, size: int, rotation_deg: float, min_area: float, max_ratio: float):
    """Affine maps [B, 6] (see ``affine_matrices``) from the pixels of a ``size`` view to those of a
    ``load`` image: a random box of ``min_area``..100% of the area, aspect 1/max_ratio..max_ratio,
    rotated by up to ``rotation_deg`` about its centre. ``u``: uniform [B, >=5] in [0, 1)."""
    area = min_area + (1.0 - min_area) * u[:, 0]
    ratio = ops.exp((2.0 * u[:, 1] - 1.0) * math.log(max_ratio))
    w = ops.minimum(ops.sqrt(area * ratio), 1.0)                   # box sides as fractions of the image
    h = ops.minimum(ops.sqrt(area / ratio), 1.0)
    cx = (u[:, 2] * (1.0 - w) + w / 2.0) * load - 0.5              # box centre in input pixels
    cy = (u[:, 3] * (1.0 - h) + h / 2.0) * load - 0.5
    angle = (2.0 * u[:, 4] - 1.0) * (rotation_deg * math.pi / 180.0)
    ctr = (size - 1.0) / 2.0
    return affine_matrices(size, angle, size / (w * load), size / (h * load), cx - ctr, cy - ctr, ops.ones_like(w))


def render_views(images, size: int, u, cfg: dict = VIEW):
    """Views of ``size`` pixels of float [B, L, L, 1] 0..255 images, one per image, from the uniform
    numbers ``u`` [B, N_PARAMS]: crop + rotation in one bilinear resampling (outside the image: 0),
    then contrast about the view's mean, brightness, clipping to 0..255, and a Gaussian blur on
    ``blur_p`` of the views. ``sample_affine`` writes an L x L grid; the view is its top-left corner."""
    images = ops.cast(images, "float32")
    mats = crop_matrices(u, images.shape[1], size, cfg["rotation_deg"], cfg["min_area"], cfg["max_ratio"])
    x = sample_affine(images, mats)[:, :size, :size, :]
    mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
    k = ops.reshape(1.0 + (2.0 * u[:, 5] - 1.0) * cfg["contrast"], (-1, 1, 1, 1))
    shift = ops.reshape((2.0 * u[:, 6] - 1.0) * cfg["brightness"] * 255.0, (-1, 1, 1, 1))
    x = ops.clip((x - mean) * k + mean + shift, 0.0, 255.0)
    lo, hi = cfg["sigma"]
    sigma = ops.where(u[:, 7] < cfg["blur_p"], lo + (hi - lo) * u[:, 8], 0.0)
    return blur(x, sigma)


def plain_views(images, size: int):
    """The whole image resampled to ``size`` pixels, unaugmented (what fine-tuning will see)."""
    # area 1, aspect 1, no rotation, contrast x1, brightness +0, no blur (see render_views)
    u = ops.convert_to_tensor([[1.0, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 0.0]], "float32")
    u = u + ops.zeros((ops.shape(images)[0], 1))
    return render_views(images, size, u, {**VIEW, "blur_p": 0.0})


class SimCLR(keras.Model):
    """uint8-range images [B, L, L, 1] (or a batch dict with "image") -> projections. Training:
    two random views per image, z [2B, d] ordered (views 1, views 2); else the plain view, z [B, d]."""

    def __init__(self, encoder, normalization, image_size: int, projection_dim=128, hidden=512, seed=None, **kw):
        super().__init__(**kw)
        self.encoder, self.image_size = encoder, image_size
        self.backbone_input = BackboneInput(normalization)
        self.proj_1 = keras.layers.Dense(hidden, name="proj_1")
        self.proj_bn = keras.layers.BatchNormalization(name="proj_bn")
        self.proj_2 = keras.layers.Dense(projection_dim, dtype="float32", name="proj_2")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def views(self, images):
        """Two random views of every image, [2B, S, S, 1]."""
        images = ops.cast(images, "float32")
        two = ops.concatenate([images, images], axis=0)
        u = keras.random.uniform((ops.shape(two)[0], N_PARAMS), 0.0, 1.0, seed=self.seed_generator)
        return render_views(two, self.image_size, u)

    def call(self, inputs, training=False):
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        x = self.views(images) if training else plain_views(ops.cast(images, "float32"), self.image_size)
        f = self.encoder(self.backbone_input(x), training=training)
        f = ops.mean(f, axis=tuple(range(1, len(f.shape) - 1)))  # global average pool, maps or tokens
        x = ops.relu(self.proj_bn(self.proj_1(f), training=training))
        return self.proj_2(x)



def build_simclr(arch: str, image_size: int, projection_dim: int = 128, hidden: int = 512, seed=None):
    """(SimCLR model mapping uint8-range images to projections, its bare registry encoder)."""
    spec = get_spec(arch)
    encoder = build_backbone(spec, image_size, None)
    return SimCLR(encoder, spec.normalization, image_size, projection_dim, hidden, seed,
                           name=f"simclr_{arch}"), encoder


def recalibrate_batchnorm(model, batches, max_batches: int | None = None) -> int:
    """Set every BatchNormalization layer's moving mean and variance to their average over
    ``batches`` (precise BN, Wu & Johnson 2021). Returns the number of batches used.

    Fine-tuning and inference run the pretrained encoder with BatchNormalization in inference
    mode, on its moving statistics. After a short contrastive run these are mostly still their
    initial values (0 and 1: MobileNetV3 and EfficientNet keep 99.9% of the old value per step),
    so the encoder maps every X-ray to nearly the same features. Here each layer's statistics
    become the cumulative mean over the batches (momentum k/(k+1) at the k-th batch), taken on
    plain, unaugmented images, which is what the encoder sees downstream."""
    bns = [l for l in iter_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    momenta = [l.momentum for l in bns]
    k = 0
    try:
        for x in batches:
            if max_batches is not None and k >= max_batches:
                break
            for layer in bns:
                layer.momentum = k / (k + 1)
            model(x, training=True)  # eager: each call reads the momentum set above
            k += 1
    finally:
        for layer, m in zip(bns, momenta):
            layer.momentum = m
    return k

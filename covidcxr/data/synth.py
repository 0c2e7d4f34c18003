"""Synthetic CXR-like images with lung masks, in the Kaggle layout.

Not real anatomy, but the parts that matter for a model are there: a body
outline, two lung fields (the lung mask), ribs, clavicles, spine and a heart
shadow that the mask excludes, and a finding per class placed where the
radiology literature puts it:

- ``COVID``: bilateral, peripheral and lower-zone ground-glass haze;
- ``Lung_Opacity``: one or two focal dense consolidations in one lung;
- ``Viral Pneumonia``: a diffuse, perihilar reticular (interstitial) pattern;
- ``Normal``: clear lungs.

Exposure, contrast, gamma, position, size and noise vary per image, so a
model has to learn the findings rather than the global brightness.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def _ellipse(yy, xx, cy, cx, ry, rx, soft):
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / soft, 50.0)))


def _smooth_noise(rng, size, sigma):
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return n / (n.std() + 1e-8)


def synth_cxr(rng: np.random.Generator, size: int, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic radiograph: (uint8 image, uint8 mask in {0, 255}), both size x size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    s = size / 256.0
    # Patient position and build vary.
    dx, dy = rng.normal(0, 0.035, 2)
    scale = rng.uniform(0.85, 1.08)
    tilt = rng.normal(0, 0.05)
    xx_c = ((xx - 0.5) * np.cos(tilt) - (yy - 0.5) * np.sin(tilt) - dx) / scale + 0.5
    yy_c = ((xx - 0.5) * np.sin(tilt) + (yy - 0.5) * np.cos(tilt) - dy) / scale + 0.5

    img = 0.06 + 0.02 * _smooth_noise(rng, size, 8 * s)
    body = _ellipse(yy_c, xx_c, rng.uniform(0.56, 0.66), 0.5, rng.uniform(0.55, 0.66), rng.uniform(0.37, 0.48), 0.03)
    shoulders = _ellipse(yy_c, xx_c, 0.18, 0.5, 0.12, 0.50, 0.05)
    body = np.maximum(body, shoulders * (yy_c > 0.1))
    img = img + 0.45 * body

    lung_r = _ellipse(yy_c, xx_c, 0.47 + rng.normal(0, 0.01), 0.31 + rng.normal(0, 0.01),
                      0.27 * rng.uniform(0.93, 1.07), 0.135 * rng.uniform(0.92, 1.08), 0.04)
    lung_l = _ellipse(yy_c, xx_c, 0.48 + rng.normal(0, 0.01), 0.69 + rng.normal(0, 0.01),
                      0.26 * rng.uniform(0.93, 1.07), 0.125 * rng.uniform(0.92, 1.08), 0.04)
    heart = _ellipse(yy_c, xx_c, 0.64, 0.565 + rng.normal(0, 0.01), 0.12 * rng.uniform(0.9, 1.1),
                     0.125 * rng.uniform(0.9, 1.15), 0.06)
    lungs_soft = np.clip(lung_r + lung_l, 0, 1) * (1 - heart)
    mask = lungs_soft > 0.5
    img = img - 0.30 * lungs_soft * body

    img = _bones(img, rng, xx_c, yy_c, body, heart)
    img = _findings(img, rng, cls, size, s, xx, yy, xx_c, yy_c, mask, lungs_soft)
    img = _exposure(img, rng, s)
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img8, (mask.astype(np.uint8) * 255)


def write_synthetic_dataset(out: str | Path, per_class: int = 60, size: int = 128, seed: int = 0,
                            classes: tuple[str, ...] = CLASSES, progress: bool = True) -> Path:
    """Write ``<out>/<Class>/images/<Class>-<n>.png`` and ``masks/`` like Kaggle's set."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    jobs = [(c, i) for i in range(per_class) for c in classes]
    for cls in classes:
        (out / cls / "images").mkdir(parents=True, exist_ok=True)
        (out / cls / "masks").mkdir(parents=True, exist_ok=True)
    for cls, i in tqdm(jobs, desc="synthesising CXRs", unit="img", disable=not progress, mininterval=0.5):
        img, mask = synth_cxr(rng, size, cls)
        name = f"{cls}-{i + 1}.png"
        Image.fromarray(img, mode="L").save(out / cls / "images" / name)
        Image.fromarray(mask, mode="L").save(out / cls / "masks" / name)
    (out / "README.txt").write_text(
        f"Synthetic CXR-like images written by covidcxr (python -m covidcxr.data synth).\n"
        f"{per_class} images per class, {size}x{size} px, seed {seed}. Not real X-rays: for demos and tests.\n")
    return out


def _bones(img, rng, xx_c, yy_c, body, heart):
    """Spine, heart shadow, ribs and clavicles."""
    # Spine / mediastinum and heart shadow.
    img = img + 0.18 * np.exp(-((xx_c - 0.5) / 0.045) ** 2) * body * (yy_c > 0.08)
    img = img + 0.06 * heart
    # Ribs: curved bands descending laterally, both sides.
    rib_phase = rng.uniform(0, 0.02)
    for k in range(9):
        base = 0.20 + 0.062 * k + rib_phase
        for side in (-1, 1):
            xr = (xx_c - 0.5) * side
            curve = base + 0.22 * np.clip(xr - 0.04, 0, None) ** 1.3 + 0.05 * np.clip(xr, 0, None)
            band = np.exp(-((yy_c - curve) / 0.011) ** 2) * (xr > 0.03) * (xr < 0.45)
            img = img + 0.07 * band * body
    # Clavicles.
    for side in (-1, 1):
        xr = (xx_c - 0.5) * side
        line = 0.16 + 0.12 * np.clip(0.30 - xr, 0, None)
        img = img + 0.10 * np.exp(-((yy_c - line) / 0.012) ** 2) * (xr > 0.05) * (xr < 0.38)
    return img


def _findings(img, rng, cls, size, s, xx, yy, xx_c, yy_c, mask, lungs_soft):
    """The class's findings, confined to the lungs."""
    lung_px = mask.astype(np.float32)
    if cls == "COVID":
        dist = ndimage.distance_transform_edt(mask) / size
        periph = np.exp(-dist / 0.06)
        lower = np.clip((yy_c - 0.30) / 0.3, 0, 1)
        patchy = np.clip(0.8 + 0.5 * _smooth_noise(rng, size, 6 * s), 0, None)
        img = img + rng.uniform(0.22, 0.32) * periph * lower * patchy * lungs_soft
    elif cls == "Lung_Opacity":
        for _ in range(rng.integers(1, 3)):
            ys, xs = np.nonzero(mask)
            i = rng.integers(len(ys))
            r = rng.uniform(0.04, 0.075)
            blob = np.exp(-(((yy - ys[i] / size) ** 2 + (xx - xs[i] / size) ** 2) / (2 * r * r)))
            texture = np.clip(1 + 0.25 * _smooth_noise(rng, size, 4 * s), 0, None)
            img = img + rng.uniform(0.28, 0.42) * blob * texture * ndimage.gaussian_filter(lung_px, 3 * s)
    elif cls == "Viral Pneumonia":
        noise = rng.standard_normal((size, size))
        reticular = np.abs(ndimage.gaussian_filter(noise, 1.0 * s) - ndimage.gaussian_filter(noise, 2.5 * s))
        reticular /= reticular.std() + 1e-8
        hilar = np.exp(-((xx_c - 0.5) / 0.22) ** 2) * np.exp(-((yy_c - 0.5) / 0.25) ** 2)
        img = img + rng.uniform(0.06, 0.09) * reticular * (0.5 + hilar) * lungs_soft
    return img


def _exposure(img, rng, s):
    """Exposure, processing and noise."""
    img = ndimage.gaussian_filter(img, rng.uniform(0.4, 1.0) * s)
    img = np.clip(img, 0, None)
    img = img / max(np.percentile(img, 99.5), 1e-6)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.8, 1.0) + rng.uniform(0.0, 0.08)
    img = img + rng.normal(0, 0.015, img.shape)
    return img

"""Pictures of an evaluation: Grad-CAM panels, right/wrong examples, segmentation overlays."""
from __future__ import annotations

from pathlib import Path

from PIL import Image
import numpy as np
import pandas as pd

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import read_image, read_mask
from covidcxr.evaluation.passes import items_of
from covidcxr.gradcam import GradCAM, render_cam
from covidcxr.gradcam import overlay as cam_overlay
from covidcxr.masks import overlay
from covidcxr.plots import plot_image_grid


def _pick(rng, idx: np.ndarray, n: int) -> np.ndarray:
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False)) if len(idx) and n else idx[:0]


def gradcam(predictor, df: pd.DataFrame, y: np.ndarray, probs: np.ndarray, classes, n_per_class: int,
            layer: str | None, out: Path, seed: int, context: str, eval_class_of=None) -> dict:
    """Grad-CAM for up to ``n_per_class`` images of each true class (explaining the predicted class),
    in batches: one PNG per image (true class, prediction, probability, colour bar, flat-map note)
    and a grid. ``probs`` are the model's own class probabilities; ``eval_class_of[k]`` names the
    evaluation class of model class k (external validation; default: the same)."""
    cam = GradCAM(predictor.model, layer)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([_pick(rng, np.flatnonzero(y == i), n_per_class) for i in range(len(classes))])
    sub = df.iloc[chosen].reset_index(drop=True)
    panels, files, flat = {}, [], 0
    model_classes = predictor.classes
    eval_class_of = eval_class_of or model_classes
    for batch in predictor.run(items_of(sub), keep_gray=True):
        res = cam.explain(batch.x)
        for j, d in enumerate(batch.done):
            r = chosen[d.item.key]
            k = int(res.class_index[j])
            true = classes[y[r]]
            name = Path(d.item.path).stem + ".png"
            (out / "gradcam" / true).mkdir(parents=True, exist_ok=True)
            note = res.note(j)
            flat += bool(res.flat[j])
            render_cam(d.gray, res.heatmaps[j], out / "gradcam" / true / name,
                       [f"true: {true}", f"predicted: {model_classes[k]} {probs[r, k]:.2f}",
                        Path(d.item.path).name], note=note)
            files.append(f"gradcam/{true}/{name}")
            caption = f"{Path(d.item.path).name}\npred {model_classes[k]} {probs[r, k]:.2f}" + ("\nflat map" if note else "")
            panels.setdefault(true, []).append((cam_overlay(d.gray, res.heatmaps[j]), caption,
                                                "green" if eval_class_of[k] == true else "red"))
    desc = cam.describe(predictor.card.image_size)
    rows = [(f"true {c}", panels[c]) for c in classes if c in panels]
    if rows:
        plot_image_grid(rows, out / "gradcam.png", f"Grad-CAM of {desc}, explaining the predicted class",
                        context=context, colorbar="relative importance (0-1)")
    return {"layer": cam.layer_name, "layer_description": desc, "files": files, "flat_maps": flat,
            "note": (f"{flat} of {len(files)} maps are flat: the model's evidence is spread evenly there and the map "
                     f"shows no localisation" if flat else "")}


def examples(df: pd.DataFrame, y: np.ndarray, probs: np.ndarray, classes, out: Path, context: str,
             n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pred = probs.argmax(axis=1)
    rows = []
    for i, c in enumerate(classes):
        for ok in (True, False):
            items = []
            for j in _pick(rng, np.flatnonzero((y == i) & ((pred == i) == ok)), n):
                k = int(pred[j])
                items.append((read_image(df["path"].iloc[j]), f"{Path(df['path'].iloc[j]).name}\npred {classes[k]} "
                              f"{probs[j, k]:.2f}, p({c}) {probs[j, i]:.2f}", "green" if ok else "red"))
            if items:
                rows.append((f"{c}: {'right' if ok else 'wrong'}", items))
    return plot_image_grid(rows, out / "examples.png", "Correctly (green) and wrongly (red) classified examples",
                           context=context)


def worst(dice: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` of ``idx`` with the lowest Dice, lowest first (ties: in row order)."""
    return idx[np.argsort(dice[idx], kind="stable")][:n]


def overlays(df: pd.DataFrame, col: str, masks: np.ndarray, per_image: dict, out: Path, n: int,
             target: str, context: str) -> dict:
    """Prediction (red) over ground truth (green) for the worst cases: the ``ceil(n / classes)``
    images of each class with the lowest Dice, lowest first. {files, selection}."""
    labels, dice = df["label"].to_numpy(), np.asarray(per_image["dice"], float)
    per_class = int(np.ceil(n / max(1, len(set(labels))))) if n else 0
    rows, files = [], []
    for c in sorted(set(labels)):
        items, pool = [], np.flatnonzero(labels == c)
        for rank, j in enumerate(worst(dice, pool, per_class), 1):
            path = df["path"].iloc[j]
            gray = read_image(path)
            truth = read_mask(df[col].iloc[j], (gray.shape[1], gray.shape[0]))
            pic = overlay(gray, P.mask_from_probs(masks[j], *gray.shape), truth)
            (out / "overlays" / c).mkdir(parents=True, exist_ok=True)
            name = f"overlays/{c}/{Path(path).stem}.png"
            Image.fromarray(pic).save(out / name)
            files.append(name)
            items.append((pic, f"{Path(path).name}\nDice {dice[j]:.3f} (#{rank} lowest of {len(pool)})", "black"))
        if items:
            rows.append((f"{c}: lowest Dice", items))
    which = "the lowest-Dice image" if per_class == 1 else f"the {per_class} lowest-Dice images"
    if rows:
        plot_image_grid(rows, out / "segmentation.png", f"{target} masks, {which} of each class: prediction red, "
                        f"ground truth green", context=context)
    return {"files": files, "selection": f"{which} of each class (worst first)" if per_class else None}

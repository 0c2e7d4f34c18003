"""Plots written into run directories (matplotlib, Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history_csv: str | Path, out: str | Path) -> Path | None:
    """Accuracy, loss and validation macro-F1 per epoch; the phase change marked."""
    import pandas as pd

    history_csv = Path(history_csv)
    if not history_csv.exists():
        return None
    h = pd.read_csv(history_csv)
    if h.empty:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = h["epoch"] + 1
    first = next((k for k in ("accuracy", "label_accuracy", "dice", "mask_dice") if k in h), "accuracy")
    for ax, key, title in ((axes[0], first, first.replace("_", " ").capitalize()), (axes[1], "loss", "Loss")):
        if key in h:
            ax.plot(x, h[key], "o-", label="train")
        if f"val_{key}" in h:
            ax.plot(x, h[f"val_{key}"], "s-", label="validation")
        ax.set_title(title)
    for key, label in (("val_macro_f1", "val macro-F1"), ("val_macro_auc", "val macro-AUC"),
                       ("val_dice", "val Dice"), ("val_iou", "val IoU"), ("val_mask_dice", "val mask Dice")):
        if key in h:
            axes[2].plot(x, h[key], "o-", label=label)
    axes[2].set_title("Validation selection metrics")
    axes[2].set_ylim(0, 1.02)
    if "phase" in h and (h["phase"] == 2).any():
        start = x[h["phase"] == 2].iloc[0] - 0.5
        for ax in axes:
            ax.axvline(start, color="grey", ls="--", lw=1)
            ax.text(start, ax.get_ylim()[1], " fine-tune", va="top", fontsize=8, color="grey")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def class_colors(class_names: list[str]) -> dict[str, tuple]:
    """One fixed colour per class (tab10 in class order), shared by every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {c: cmap(i % 10) for i, c in enumerate(class_names)}


def plot_confusion(cm, class_names: list[str], out: str | Path, title: str = "") -> Path:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    import numpy as np

    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(5.2 * 2 + 1, 4.6 + 0.15 * k))
    for ax, mat, fmt, sub in ((axes[0], cm, "{:.0f}", "counts"), (axes[1], norm, "{:.2f}", "row-normalised (recall)")):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center",
                        color="white" if mat[i, j] > 0.6 * (mat.max() or 1) else "black", fontsize=10)
        ax.set_xticks(range(k), class_names, rotation=30, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix, {sub}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_roc(y, probs, class_names: list[str], out: str | Path) -> Path:
    """One-vs-rest ROC per class (AUC in the legend) plus micro and macro averages."""
    import numpy as np
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    colors = class_colors(class_names)
    y = np.asarray(y, int)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    grid = np.linspace(0, 1, 201)
    tprs = []
    for i, c in enumerate(class_names):
        yb = (y == i).astype(int)
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, i])
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, color=colors[c], lw=2, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
    onehot = np.eye(len(class_names))[y]
    if len(tprs):
        fpr, tpr, _ = roc_curve(onehot.ravel(), np.asarray(probs).ravel())
        ax.plot(fpr, tpr, "k:", lw=2, label=f"micro-average (AUC {auc(fpr, tpr):.3f})")
        mean = np.mean(tprs, axis=0)
        mean[0] = 0.0
        ax.plot(grid, mean, "k--", lw=1.5, label=f"macro-average (AUC {auc(grid, mean):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curves, one class vs rest")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_pr(y, probs, class_names: list[str], out: str | Path) -> Path:
    """Precision-recall curve per class with average precision and the class prevalence."""
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _plt()
    colors = class_colors(class_names)
    y = np.asarray(y, int)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    for i, c in enumerate(class_names):
        yb = (y == i).astype(int)
        if not yb.any():
            continue
        prec, rec, _ = precision_recall_curve(yb, probs[:, i])
        ap = average_precision_score(yb, probs[:, i])
        ax.plot(rec, prec, color=colors[c], lw=2, label=f"{c} (AP {ap:.3f}, prevalence {yb.mean():.2f})")
        ax.axhline(yb.mean(), color=colors[c], lw=0.8, ls=":")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall curves (dotted: chance = prevalence)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_reliability(bins_before: dict, bins_after: dict | None, ece_before: float, ece_after: float | None,
                     temperature: float | None, out: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    import numpy as np

    plt = _plt()
    panels = [("uncalibrated", bins_before, ece_before)]
    if bins_after is not None:
        panels.append((f"temperature T={temperature:.3f}", bins_after, ece_after))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (name, b, e) in zip(axes[0], panels):
        edges = np.asarray(b["edges"])
        width = edges[1] - edges[0]
        acc = [a if a is not None else 0 for a in b["accuracy"]]
        conf = [c if c is not None else 0 for c in b["confidence"]]
        ax.bar(edges[:-1], acc, width=width, align="edge", color="tab:blue", alpha=0.8, edgecolor="k", label="accuracy")
        ax.bar(edges[:-1], np.array(conf) - np.array(acc), bottom=acc, width=width, align="edge",
               color="tab:red", alpha=0.3, edgecolor="r", hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {e:.3f} ({len(edges) - 1} bins)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(edges[:-1] + width / 2, b["count"], "o-", color="grey", ms=3, lw=0.8)
        ax2.set_ylabel("images per bin", color="grey")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_image_grid(rows: list[tuple[str, list[tuple]]], out: str | Path, title: str = "") -> Path:
    """rows: (row title, [(image HxW or HxWx3, caption, colour)]) -> one figure, one row each."""
    import numpy as np

    plt = _plt()
    ncol = max([len(items) for _, items in rows] + [1])
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.1 * ncol + 0.8, 2.4 * len(rows) + 0.4), squeeze=False)
    for r, (name, items) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                img, caption, color = items[c]
                ax.imshow(img, cmap="gray" if np.ndim(img) == 2 else None, vmin=0, vmax=1 if np.ndim(img) == 2 else None)
                ax.set_title(caption, fontsize=7, color=color)
        axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)

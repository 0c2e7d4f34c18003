"""Plots written into run directories (matplotlib ``Figure`` on the Agg canvas: no display, no pyplot state).

Every plot can name what it shows (``context``, e.g. "test split, n=135", added to its
title). Titles, legend entries and captions are wrapped to the width they have
(``wrap_text``) rather than clipped, the figure grows by the lines added, and
constrained layout keeps the (sup)titles inside the figure.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve
from sklearn.metrics import auc, roc_curve

_EM = 0.62   # average character width of the default font (DejaVu Sans), in font sizes
_DPI = 110
SELECTION_METRICS = ("val_macro_f1", "val_dice", "val_mask_dice")  # plot_history's default best-epoch monitor


def wrap_text(text: str, width_in: float, fontsize: float = 10.0) -> str:
    """``text`` with each of its lines wrapped to fit ``width_in`` inches at ``fontsize`` points
    (long words such as file names are broken too)."""
    chars = max(8, int(width_in * 72 / (fontsize * _EM)))
    return "\n".join(textwrap.fill(line, chars) if line.strip() else line for line in str(text).split("\n"))


def _n_lines(text: str) -> int:
    return text.count("\n") + 1 if text else 0


def _titled(title: str, context: str) -> str:
    return " \u2014 ".join(part for part in (title, context) if part)


def titled_figure(width: float, height: float, title: str = "", fontsize: float = 11.0):
    """A constrained-layout Figure on an Agg canvas at the saving dpi, ``width`` inches wide and
    ``height`` inches plus room for the wrapped ``title`` (drawn as the suptitle)."""
    text = wrap_text(title, width - 0.4, fontsize) if title else ""
    fig = Figure(figsize=(width, height + _n_lines(text) * fontsize * 1.4 / 72), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if text:
        fig.suptitle(text, fontsize=fontsize)
    return fig


def _save(fig, out: str | Path) -> Path:
    fig.savefig(out, dpi="figure")
    return Path(out)


def _legend(ax, width_in: float, fontsize: float = 8, **kwargs) -> None:
    """A legend whose labels wrap to ``width_in`` inches; none when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, [wrap_text(label, width_in, fontsize) for label in labels], fontsize=fontsize, **kwargs)


def _history_x(h):
    """1-based epoch numbers (the ``epoch`` column is 0-based; row order when it is missing)."""
    epoch = pd.to_numeric(h["epoch"], errors="coerce") if "epoch" in h else None
    if epoch is not None and epoch.notna().all():
        return epoch.astype(int) + 1
    return pd.Series(range(1, len(h) + 1), index=h.index)


def best_epoch(h, monitor: str | None = None, mode: str = "max") -> tuple[str, int, float] | None:
    """(monitor, 1-based epoch, value) of the best row of a history table, or None when the
    monitor column is missing or empty. Default monitor: the first of ``SELECTION_METRICS`` present."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    key = monitor or next((k for k in SELECTION_METRICS if k in h), None)
    if key is None or key not in h:
        return None
    values = pd.to_numeric(h[key], errors="coerce")
    if values.isna().all():
        return None
    i = values.idxmax() if mode == "max" else values.idxmin()
    return key, int(_history_x(h)[i]), float(values[i])


def _history_panels(axes, h, x) -> None:
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


def plot_history(history_csv: str | Path, out: str | Path, monitor: str | None = None,
                 mode: str = "max") -> Path | None:
    """Accuracy, loss and validation metrics per epoch (integer ticks, 1-based), the fine-tune phase
    marked, and the best epoch by ``monitor`` (``mode`` max or min; see ``best_epoch``) drawn as a
    vertical line labelled "best epoch N (<monitor> <value>)". None when there is no history."""
    history_csv = Path(history_csv)
    if not history_csv.exists():
        return None
    h = pd.read_csv(history_csv)
    if h.empty:
        return None
    fig = titled_figure(15, 4.2)
    axes = fig.subplots(1, 3)
    x = _history_x(h)
    _history_panels(axes, h, x)
    best = best_epoch(h, monitor, mode)
    if "phase" in h and (h["phase"] == 2).any():
        start = x[h["phase"] == 2].iloc[0] - 0.5
        for ax in axes:
            ax.axvline(start, color="grey", ls="--", lw=1)
            ax.text(start, ax.get_ylim()[1], " fine-tune", va="top", fontsize=8, color="grey")
    for ax in axes:
        if best is not None:
            ax.axvline(best[1], color="tab:green", ls=":", lw=1.5,
                       label=f"best epoch {best[1]} ({best[0]} {best[2]:.3f})" if ax is axes[2] else None)
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _legend(ax, 4.0, fontsize=9)
    return _save(fig, out)


def class_colors(class_names: list[str]) -> dict[str, tuple]:
    """One fixed colour per class (tab10 in class order), shared by every plot."""
    cmap = colormaps["tab10"]
    return {c: cmap(i % 10) for i, c in enumerate(class_names)}


def plot_confusion(cm, class_names: list[str], out: str | Path, title: str = "", context: str = "") -> Path:
    """Counts and row-normalised (recall) confusion matrices side by side; ``title`` and ``context``
    (e.g. "test split, n=135") as the suptitle."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    names = [wrap_text(c, 1.4, 10) for c in class_names]
    fig = titled_figure(5.2 * 2 + 1, 4.6 + 0.15 * k, _titled(title, context))
    for ax, mat, fmt, sub in zip(fig.subplots(1, 2), (cm, norm), ("{:.0f}", "{:.2f}"),
                                 ("counts", "row-normalised (recall)")):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center",
                        color="white" if mat[i, j] > 0.6 * (mat.max() or 1) else "black", fontsize=10)
        ax.set_xticks(range(k), names, rotation=30, ha="right")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix, {sub}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out)


def plot_roc(y, probs, class_names: list[str], out: str | Path, context: str = "", point: dict | None = None) -> Path:
    """One-vs-rest ROC per class (AUC in the legend) plus micro and macro averages; ``point``
    ({"class", "fpr", "tpr", "label"}: an operating point) is marked on its class's curve."""
    colors = class_colors(class_names)
    y = np.asarray(y, int)
    fig = titled_figure(6.4, 5.6, _titled("ROC curves, one class vs rest", context))
    ax = fig.subplots()
    grid = np.linspace(0, 1, 201)
    tprs = []
    for i, c in enumerate(class_names):
        yb = (y == i).astype(int)
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, i])
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, color=colors[c], lw=2, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
        if point and point["class"] == c:
            ax.plot([point["fpr"]], [point["tpr"]], "o", ms=10, mfc="none", mec=colors[c], mew=2.5, label=point["label"])
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
    _legend(ax, 2.6, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_pr(y, probs, class_names: list[str], out: str | Path, context: str = "") -> Path:
    """Precision-recall curve per class with average precision and the class prevalence."""
    colors = class_colors(class_names)
    y = np.asarray(y, int)
    fig = titled_figure(6.4, 5.6, _titled("Precision-recall curves (dotted: chance = prevalence)", context))
    ax = fig.subplots()
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
    _legend(ax, 2.6, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, out)


FEW_IN_BIN = 10   # a reliability bin with fewer images is drawn hatched and faint: it is hardly evidence


def _reliability_panel(ax, b: dict, name: str, e: float) -> None:
    """Accuracy bars (opacity growing with the bin's images, hatched under ``FEW_IN_BIN``), the gap to
    the mean confidence, and n at each bar's foot."""
    edges, count = np.asarray(b["edges"]), np.asarray(b["count"], int)
    width = edges[1] - edges[0]
    acc = np.array([a if a is not None else 0 for a in b["accuracy"]])
    conf = np.array([c if c is not None else 0 for c in b["confidence"]])
    bars = ax.bar(edges[:-1], acc, width=width, align="edge", color="tab:blue", edgecolor="k")
    gaps = ax.bar(edges[:-1], conf - acc, bottom=acc, width=width, align="edge", color="tab:red", edgecolor="r",
                  hatch="//")
    top = max(int(count.max()), 1)
    for bar, gap, n in zip(bars, gaps, count):
        alpha = 0.15 + 0.75 * np.sqrt(n / top)
        bar.set_alpha(alpha)
        gap.set_alpha(0.4 * alpha)
        if 0 < n < FEW_IN_BIN:
            bar.set_hatch("xx")
            bar.set_linestyle("--")
        if n:
            ax.text(bar.get_x() + width / 2, 0.01, f"n={n}", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(wrap_text(f"{name}: ECE {e:.3f} ({len(edges) - 1} bins, {int(count.sum())} images)", 4.2, 10),
                 fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    handles = [Patch(facecolor="tab:blue", edgecolor="k", alpha=0.9, label="accuracy (opacity: images in the bin)"),
               Patch(facecolor="tab:blue", edgecolor="k", alpha=0.2, hatch="xx", ls="--",
                     label=f"fewer than {FEW_IN_BIN} images: hardly evidence"),
               Patch(facecolor="tab:red", edgecolor="r", alpha=0.3, hatch="//", label="gap to confidence")]
    ax.legend(handles, [wrap_text(h.get_label(), 2.2, 8) for h in handles], fontsize=8, loc="upper left")


def plot_reliability(bins_before: dict, bins_after: dict | None, ece_before: float, ece_after: float | None,
                     temperature: float | None, out: str | Path, context: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling;
    each bar says how many images it holds, and bins with few images look faint (``_reliability_panel``)."""
    panels = [("uncalibrated", bins_before, ece_before)]
    if bins_after is not None:
        panels.append((f"temperature T={temperature:.3f}", bins_after, ece_after))
    fig = titled_figure(5.2 * len(panels), 5, _titled("Reliability diagram", context))
    for ax, (name, b, e) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _reliability_panel(ax, b, name, e)
    return _save(fig, out)


def plot_dice_histogram(dice, labels, out: str | Path, target: str = "", context: str = "") -> Path:
    """Dice per image, stacked by class (20 bins on [0, 1]), with each class's n and mean and the overall mean."""
    dice, labels = np.asarray(dice, float), np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    colors = class_colors(classes)
    fig = titled_figure(6.4, 4.6, _titled(f"Dice per image{f' ({target} masks)' if target else ''}", context))
    ax = fig.subplots()
    ax.hist([dice[labels == c] for c in classes], bins=np.linspace(0, 1, 21), stacked=True, edgecolor="white",
            color=[colors[c] for c in classes],
            label=[f"{c} (n={int((labels == c).sum())}, mean {dice[labels == c].mean():.3f})" for c in classes])
    ax.axvline(dice.mean(), color="k", ls="--", lw=1, label=f"all images: mean {dice.mean():.3f} (n={len(dice)})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice")
    ax.set_ylabel("images")
    _legend(ax, 2.6, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_single_class(single: dict, out: str | Path, context: str = "") -> Path:
    """A set of one class: the histogram of that class's predicted probability (quartiles marked) and
    the predicted-class counts (``evaluation.figures.single_class``)."""
    c, pr = single["class"], single["probability"]
    fig = titled_figure(11, 4.4, _titled(f"Every image is {c}: its predicted probability and the predicted class",
                                         context))
    hist, counts = fig.subplots(1, 2)
    edges = np.asarray(pr["histogram"]["edges"])
    hist.bar(edges[:-1], pr["histogram"]["counts"], width=np.diff(edges), align="edge", color="tab:blue",
             edgecolor="k", alpha=0.8)
    for q, ls in (("25%", ":"), ("50%", "--"), ("75%", ":")):
        hist.axvline(pr["quantiles"][q], color="k", ls=ls, lw=1, label=f"{q} quantile {pr['quantiles'][q]:.3f}")
    hist.set_xlim(0, 1)
    hist.set_xlabel(f"p({c})")
    hist.set_ylabel("images")
    hist.set_title(wrap_text(f"mean {pr['mean']:.3f}, n={single['n']}", 5, 10), fontsize=10)
    _legend(hist, 2.2, loc="upper left")
    names = list(single["predicted_counts"])
    values = [single["predicted_counts"][k] for k in names]
    counts.barh(range(len(names)), values, color=["tab:green" if k == c else "tab:red" for k in names])
    counts.set_yticks(range(len(names)), [wrap_text(k, 1.6, 9) for k in names])
    counts.invert_yaxis()   # classes top to bottom in their order
    for i, v in enumerate(values):
        counts.text(v, i, f" {v}", va="center", fontsize=9)
    counts.set_xlim(0, max(values + [1]) * 1.15)
    counts.set_xlabel("images predicted as")
    counts.set_title(wrap_text(f"sensitivity of {c}: {single['sensitivity']:.3f} ({single['correct']} of "
                               f"{single['n']})", 5, 10), fontsize=10)
    return _save(fig, out)


def plot_image_grid(rows: list[tuple[str, list[tuple]]], out: str | Path, title: str = "", context: str = "",
                    colorbar: str | None = None) -> Path:
    """rows: (row title, [(image HxW or HxWx3, caption, colour)]) -> one figure, one row each.
    Captions wrap within their panel; ``colorbar``: a label for one shared jet 0-1 colour bar
    (Grad-CAM grids)."""
    panel, size = 2.1, 7
    ncol = max([len(items) for _, items in rows] + [1])
    captions = [[wrap_text(item[1], panel - 0.15, size) for item in items] for _, items in rows]
    cap_lines = max([_n_lines(c) for row in captions for c in row] + [1])
    width = panel * ncol + 0.8 + (0.9 if colorbar else 0)
    row_height = panel + cap_lines * size * 1.4 / 72 + 0.1
    fig = titled_figure(width, row_height * len(rows) + 0.2, _titled(title, context), 10)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (name, items) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(items):
                img, _, color = items[c]
                gray = np.ndim(img) == 2
                ax.imshow(img, cmap="gray" if gray else None, vmin=0, vmax=1 if gray else None)
                ax.set_title(captions[r][c], fontsize=size, color=color)
        axes[r][0].text(-0.08, 0.5, wrap_text(name, panel, 9), transform=axes[r][0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=9)
    if colorbar:
        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes.ravel().tolist(), fraction=0.03)
        bar.set_label(wrap_text(colorbar, panel * len(rows), 9), fontsize=9)
    return _save(fig, out)

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
    for ax, key, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        if key in h:
            ax.plot(x, h[key], "o-", label="train")
        if f"val_{key}" in h:
            ax.plot(x, h[f"val_{key}"], "s-", label="validation")
        ax.set_title(title)
    for key, label in (("val_macro_f1", "val macro-F1"), ("val_macro_auc", "val macro-AUC")):
        if key in h:
            axes[2].plot(x, h[key], "o-", label=label)
    axes[2].set_title("Validation macro-F1 / AUC")
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

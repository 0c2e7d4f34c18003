"""subgroups.png: a forest plot of one metric (macro-AUC; Dice for segmenters) with its 95% interval per
subgroup, attribute by attribute, the overall figure as a dashed line (its interval shaded); small
subgroups drawn hollow and marked, figures that cannot be computed written as n/a with the reason."""
from __future__ import annotations

from pathlib import Path

from covidcxr.plots import titled_figure, wrap_text

NAMES = {"macro_auc": "macro ROC-AUC", "dice": "mean Dice"}


def forest_metric(sub: dict) -> str | None:
    """The metric the forest plot shows: macro-AUC when there is one, else Dice."""
    return next((k for k in ("macro_auc", "dice") if k in sub["metrics"]), None)


def _rows(sub: dict, metric: str) -> list[tuple]:
    """(label, entry, small, is_header) top to bottom."""
    rows = []
    for attr, a in sub["by_attribute"].items():
        rows.append((attr, None, False, True))
        for g in a["groups"]:
            label = f"  {g['value']} (n={g['n']}{', small' if g['small'] else ''})"
            rows.append((label, g["metrics"][metric], g["small"], False))
    return rows


def plot_forest(sub: dict, out: str | Path, context: str = "") -> Path | None:
    metric = forest_metric(sub)
    if metric is None or not sub["by_attribute"]:
        return None
    rows, ov = _rows(sub, metric), sub["overall"]["metrics"][metric]
    title = f"{NAMES[metric]} by subgroup, 95% intervals" + (f" \u2014 {context}" if context else "")
    fig = titled_figure(7.5, 1.2 + 0.28 * len(rows), title)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(rows), 0, -1))
    if ov["value"] is not None:
        ax.axvline(ov["value"], color="0.3", ls="--", lw=1,
                   label=f"overall {ov['value']:.3f} (n={sub['overall']['n']})")
        if ov["ci95"]:
            ax.axvspan(ov["ci95"]["low"], ov["ci95"]["high"], color="0.85", zorder=0)
    for y, (label, e, small, header) in zip(ys, rows):
        if header or e is None:
            continue
        if e["value"] is None:
            ax.text(0.02, y, wrap_text(f"n/a: {e['reason']}", 4.0, 7), fontsize=7, va="center", color="0.4",
                    transform=ax.get_yaxis_transform())
            continue
        ci = e["ci95"]
        if ci:
            ax.plot([ci["low"], ci["high"]], [y, y], color="C0", lw=1.5)
        ax.plot([e["value"]], [y], "o", ms=6, color="C0", mfc="white" if small else "C0")
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        tick.set_fontweight("bold" if r[3] else "normal")
    ax.set_ylim(0.3, len(rows) + 0.7)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(NAMES[metric] + f" (hollow: fewer than {sub['min_n']} images)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if ov["value"] is not None:
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out, dpi="figure")
    return Path(out)

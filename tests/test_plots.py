"""Plots: context in titles, nothing clipped, Grad-CAM colour bar, training curves with the best epoch."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from covidcxr import plots

CLASSES = ["COVID", "Normal", "Viral pneumonia"]
CONTEXT = "test split, n=135"


def flat(text: str) -> str:
    return " ".join(text.split())


def drawn_texts(fig) -> list[Text]:
    """The non-empty texts that drawing the figure actually draws (ticks outside the view and
    axes turned off draw none)."""
    drawn, draw = [], Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Text, "draw", record)
        fig.canvas.draw()
    return drawn


def assert_inside(fig) -> None:
    """Every text drawn lies inside the figure: nothing clipped at its edges."""
    texts = drawn_texts(fig)
    renderer, frame = fig.canvas.get_renderer(), fig.bbox
    assert texts
    for text in texts:
        box = text.get_window_extent(renderer)
        assert (frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0
                and box.y1 <= frame.y1 + 1), f"clipped: {text.get_text()!r} at {box} in {frame}"


def predictions(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    p = rng.dirichlet(np.ones(len(CLASSES)), n) + np.eye(len(CLASSES))[y]
    return y, p / p.sum(axis=1, keepdims=True)


def bins(k=5):
    return {"edges": list(np.linspace(0, 1, k + 1)), "accuracy": [0.1, 0.3, None, 0.7, 0.9],
            "confidence": [0.15, 0.35, None, 0.65, 0.95], "count": [3, 5, 0, 8, 10]}


def test_context_names_split_in_every_title(tmp_path, saved_figures):
    y, p = predictions()
    grid = [("COVID", [(np.random.default_rng(0).random((8, 8)), "a.png", "green")])]
    written = [
        plots.plot_confusion(np.eye(3) * 5 + 1, CLASSES, tmp_path / "cm.png", "Confusion", context=CONTEXT),
        plots.plot_roc(y, p, CLASSES, tmp_path / "roc.png", context=CONTEXT),
        plots.plot_pr(y, p, CLASSES, tmp_path / "pr.png", context=CONTEXT),
        plots.plot_reliability(bins(), bins(), 0.08, 0.03, 1.5, tmp_path / "rel.png", context=CONTEXT),
        plots.plot_image_grid(grid, tmp_path / "grid.png", "Examples", context=CONTEXT),
    ]
    assert all(f.exists() and f.stat().st_size > 2000 for f in written)
    assert len(saved_figures) == 5
    for fig in saved_figures:
        assert CONTEXT in flat(fig.get_suptitle()), fig.get_suptitle()
    assert flat(saved_figures[0].get_suptitle()) == f"Confusion \u2014 {CONTEXT}"
    assert flat(saved_figures[1].get_suptitle()).startswith("ROC curves, one class vs rest")


def test_long_titles_captions_and_legends_wrap_inside_the_figure(tmp_path, saved_figures):
    title = ("Grad-CAM of the predicted class for the held-out test images of the external hospital, "
             "layer conv5_block3_out of ResNet50")
    assert len(title) >= 120
    caption = "COVID-19_radiography_" + "x" * 30 + "_0042.png p=0.62"  # 60 characters, one long word
    assert len(caption) >= 60
    long_class = "Viral pneumonia (non-COVID, confirmed by RT-PCR, adults only)"
    y, p = predictions()
    rng = np.random.default_rng(1)
    rows = [(name, [(rng.random((16, 16)), caption, "red") for _ in range(3)]) for name in CLASSES[:2]]
    plots.plot_image_grid(rows, tmp_path / "grid.png", title, context=CONTEXT, colorbar="relative importance (0-1)")
    plots.plot_confusion(np.eye(3), CLASSES, tmp_path / "cm.png", title, context=CONTEXT)
    plots.plot_roc(y, p, CLASSES[:2] + [long_class], tmp_path / "roc.png", context=title)
    plots.plot_image_grid(rows, tmp_path / "short.png", "short")
    grid, confusion, roc, short = saved_figures
    for fig in (grid, confusion, roc):
        assert_inside(fig)
    assert flat(grid.get_suptitle()) == f"{title} \u2014 {CONTEXT}"  # wrapped, not cut
    assert grid.get_suptitle().count("\n") >= 1
    assert grid.get_size_inches()[1] > short.get_size_inches()[1]  # the figure grew for the title
    legend = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert any(flat(t).startswith(long_class + " (AUC") and "\n" in t for t in legend), legend  # wrapped, whole
    renderer = grid.canvas.get_renderer()
    panels = [ax for ax in grid.axes if ax.get_title()]
    assert len(panels) == 6
    for ax in panels:
        assert flat(ax.get_title()).replace(" ", "") == caption.replace(" ", "")
        assert ax.title.get_window_extent(renderer).width <= ax.get_window_extent(renderer).width * 1.02


def test_image_grid_colour_bar(tmp_path, saved_figures):
    rows = [("COVID", [(np.random.default_rng(0).random((8, 8)), "a", "green")] * 2)]
    plots.plot_image_grid(rows, tmp_path / "cam.png", colorbar="relative importance (0-1)")
    plots.plot_image_grid(rows, tmp_path / "plain.png")
    with_bar, plain = saved_figures
    assert len(with_bar.axes) == len(plain.axes) + 1
    assert with_bar.axes[-1].get_ylabel() == "relative importance (0-1)"
    assert with_bar.axes[-1].get_ylim() == pytest.approx((0, 1))


def write_history(path, rows: dict):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_history_integer_ticks_best_epoch_and_phase(tmp_path, saved_figures):
    csv = write_history(tmp_path / "history.csv", {
        "epoch": range(7), "phase": [1, 1, 1, 2, 2, 2, 2], "lr": [1e-3] * 3 + [1e-4] * 4,
        "loss": np.linspace(1, 0.3, 7), "accuracy": np.linspace(0.4, 0.9, 7),
        "val_loss": [1.0, 0.8, 0.7, 0.6, 0.5, 0.55, 0.6], "val_accuracy": np.linspace(0.4, 0.8, 7),
        "val_macro_f1": [0.3, 0.5, 0.6, 0.7, 0.9, 0.85, 0.8], "val_macro_auc": np.linspace(0.5, 0.9, 7)})
    assert plots.plot_history(csv, tmp_path / "curves.png").exists()
    plots.plot_history(csv, tmp_path / "by_loss.png", monitor="val_loss", mode="min")
    by_f1, by_loss = saved_figures
    for fig in saved_figures:
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and np.allclose(ticks, np.round(ticks)), ticks
    best = [line for line in by_f1.axes[2].get_lines() if line.get_label().startswith("best epoch")]
    assert [line.get_label() for line in best] == ["best epoch 5 (val_macro_f1 0.900)"]
    assert list(best[0].get_xdata()) == [5, 5]  # 0-based epoch 4 is the fifth
    assert "best epoch 5 (val_macro_f1 0.900)" in [t.get_text() for t in by_f1.axes[2].get_legend().get_texts()]
    assert any(line.get_label() == "best epoch 5 (val_loss 0.500)" for line in by_loss.axes[2].get_lines())
    phase = [line for line in by_f1.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert phase and list(phase[0].get_xdata()) == [3.5, 3.5]  # fine-tune starts at the fourth epoch
    assert any(t.get_text().strip() == "fine-tune" for t in by_f1.axes[0].texts)


def test_history_tolerates_missing_columns_and_one_row(tmp_path, saved_figures):
    one = write_history(tmp_path / "one.csv", {"epoch": [0], "loss": [0.7], "val_dice": [0.4]})
    assert plots.plot_history(one, tmp_path / "one.png").exists()
    no_metric = write_history(tmp_path / "nometric.csv", {"loss": [0.7, 0.6]})
    assert plots.plot_history(no_metric, tmp_path / "nometric.png", monitor="val_macro_f1").exists()
    assert plots.plot_history(tmp_path / "missing.csv", tmp_path / "x.png") is None
    first, second = saved_figures
    assert any(line.get_label() == "best epoch 1 (val_dice 0.400)" for line in first.axes[2].get_lines())
    assert not any(line.get_label().startswith("best epoch") for ax in second.axes for line in ax.get_lines())
    assert plots.best_epoch(pd.DataFrame({"val_mask_dice": [0.2, np.nan, 0.5]})) == ("val_mask_dice", 3, 0.5)
    with pytest.raises(ValueError, match="mode"):
        plots.best_epoch(pd.DataFrame({"val_dice": [0.2]}), mode="best")

"""The Evaluation tab's logic, without a browser: an evaluation folder (``covidcxr.evaluate``'s output)
read once, its predictions filtered and sorted, its confusion matrix as a grid whose cells are filters.

``EvalView(folder)``: ``.table`` (predictions.csv with ``correct`` and ``confidence`` added), ``.filter(...)``
(by true class, predicted class, correct/wrong, a confidence range and any metadata column; errors first
by default: the false negatives of the COVID class, then the other errors, then the correct rows, each by
confidence, highest first), ``.confusion_grid()`` and ``.cell_filter(row, col)`` (a clicked cell -> the
filter of its true and predicted class), ``.summary()`` (the headline figures of metrics.json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import DataError

ALL = "(all)"
OWN = ("path", "true_label", "pred_label", "train_overlap")
ERRORS_FIRST = "errors first"
TRUE_HEAD = "true \\ predicted"


@dataclass
class Filter:
    true: str = ALL
    pred: str = ALL
    outcome: str = ALL          # ALL | "correct" | "wrong"
    conf_min: float = 0.0
    conf_max: float = 1.0
    column: str = ""            # a metadata column ...
    value: str = ""             # ... and the value it must equal (text as written in predictions.csv)
    sort: str = ERRORS_FIRST    # ERRORS_FIRST or a column name
    ascending: bool = False


class EvalView:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        pred, metrics = self.folder / "predictions.csv", self.folder / "metrics.json"
        if not pred.exists() or not metrics.exists():
            raise DataError(f"--eval {folder}: no predictions.csv and metrics.json there; pass the output folder "
                            f"of python -m covidcxr.evaluate.")
        self.metrics = json.loads(metrics.read_text())
        df = pd.read_csv(pred, keep_default_na=False, float_precision="round_trip")
        self.classes = list(self.metrics.get("classes") or [c.removeprefix("prob_") for c in df if c.startswith("prob_")])
        self.prob_columns = [f"prob_{c}" for c in self.classes]
        missing = [c for c in ("path", "true_label", "pred_label", *self.prob_columns) if c not in df]
        if missing:
            raise DataError(f"{pred}: columns {missing} missing; not a classifier evaluation of covidcxr.evaluate.")
        df["correct"] = df["true_label"] == df["pred_label"]
        df["confidence"] = df[self.prob_columns].to_numpy().max(axis=1)
        self.table = df
        self.metadata = [c for c in df.columns if c not in (*OWN, *self.prob_columns, "correct", "confidence")]
        self.covid = (self.metrics.get("ci95") or {}).get("covid_class") or next(
            (c for c in self.classes if "covid" in c.lower() and "non" not in c.lower()), self.classes[0])

    # ---------------------------------------------------------------- the table

    def filter(self, f: Filter | None = None) -> pd.DataFrame:
        """The rows ``f`` lets through, in its order."""
        f, df = f or Filter(), self.table
        keep = np.ones(len(df), bool)
        if f.true != ALL:
            keep &= (df["true_label"] == f.true).to_numpy()
        if f.pred != ALL:
            keep &= (df["pred_label"] == f.pred).to_numpy()
        if f.outcome != ALL:
            keep &= df["correct"].to_numpy() == (f.outcome == "correct")
        keep &= ((df["confidence"] >= f.conf_min) & (df["confidence"] <= f.conf_max)).to_numpy()
        if f.column and f.column != ALL:
            if f.column not in df:
                raise DataError(f"no column {f.column!r} in predictions.csv; columns: {', '.join(self.metadata)}")
            keep &= (df[f.column].astype(str) == str(f.value)).to_numpy()
        return self.order(df[keep], f.sort, f.ascending)

    def order(self, df: pd.DataFrame, sort: str = ERRORS_FIRST, ascending: bool = False) -> pd.DataFrame:
        if sort and sort != ERRORS_FIRST:
            return df.sort_values(sort, ascending=ascending, kind="stable")
        rank = np.where(~df["correct"] & (df["true_label"] == self.covid), 0, np.where(~df["correct"], 1, 2))
        return df.assign(_rank=rank).sort_values(["_rank", "confidence", "path"], ascending=[True, False, True],
                                                kind="stable").drop(columns="_rank")

    def shown(self, df: pd.DataFrame) -> pd.DataFrame:
        """The columns the page shows: file name first, probabilities rounded for reading."""
        out = df[["path", "true_label", "pred_label", "correct", "confidence", *self.prob_columns, *self.metadata]].copy()
        out.insert(0, "file", [Path(p).name for p in out["path"]])
        out["correct"] = np.where(out["correct"], "correct", "wrong")
        for c in ("confidence", *self.prob_columns):
            out[c] = out[c].round(4)
        return out

    def values_of(self, column: str) -> list[str]:
        return sorted({str(v) for v in self.table[column]}) if column in self.table else []

    # ---------------------------------------------------------------- the confusion grid

    def confusion(self) -> np.ndarray:
        """Counts [true, predicted] from the table (equal to metrics.json's confusion_matrix)."""
        idx = {c: i for i, c in enumerate(self.classes)}
        m = np.zeros((len(self.classes), len(self.classes)), int)
        for t, p in zip(self.table["true_label"], self.table["pred_label"]):
            if t in idx and p in idx:
                m[idx[t], idx[p]] += 1
        return m

    def confusion_grid(self) -> pd.DataFrame:
        """Rows: true class; columns: predicted class; first column the true class's name."""
        grid = pd.DataFrame(self.confusion(), columns=self.classes)
        grid.insert(0, TRUE_HEAD, self.classes)
        return grid

    def cell_filter(self, row: int, col: int) -> Filter:
        """The filter of a clicked grid cell: its true and predicted class (the name column: the whole row)."""
        if not 0 <= row < len(self.classes):
            return Filter()
        return Filter(true=self.classes[row], pred=self.classes[col - 1] if 1 <= col <= len(self.classes) else ALL)

    # ---------------------------------------------------------------- the figures on top

    def summary(self) -> str:
        """Markdown: n, accuracy, macro-F1, macro AUC and ECE with their 95% intervals when present."""
        m, ci = self.metrics, self.metrics.get("ci95") or {}
        parts = [f"**n = {m.get('n', len(self.table))}** (split {m.get('split', '?')})"]
        for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("macro_auc", "macro AUC"),
                          ("ece", "ECE")):
            if isinstance(m.get(key), (int, float)):
                lo_hi = ci.get(key)
                band = f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 else ""
                parts.append(f"{name} {m[key]:.3f}{band}")
        errors = int((~self.table["correct"]).sum())
        fn = int((~self.table["correct"] & (self.table["true_label"] == self.covid)).sum())
        parts.append(f"{errors} errors, {fn} of them {self.covid} false negatives (listed first)")
        return " · ".join(parts)

    @property
    def confusion_png(self) -> Path | None:
        p = self.folder / "confusion_matrix.png"
        return p if p.exists() else None

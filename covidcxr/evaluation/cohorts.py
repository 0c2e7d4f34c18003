"""What the evaluator does with the scored images' metadata: the flags checked before the forward pass
(``plan``), the subgroup figures and their forest plot (``subgroups``, ``forest``), the patient-level
figures (``patients``) and predictions.csv's metadata columns; ``Evaluator`` calls these."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError
from covidcxr.evaluation import patients as PT
from covidcxr.evaluation import subgroups as S
from covidcxr.evaluation.forest import plot_forest


@dataclass
class Plan:
    subgroups: list[str] | None          # None: every attribute with data; []: none
    edges: tuple[int, ...]
    aggregate: str = "image"


@dataclass
class Scores:
    """Filled by the evaluator as it scores: classification (y, probs) and per-image Dice (row, value)."""

    y: np.ndarray | None = None
    probs: np.ndarray | None = None
    dice_rows: list | None = None
    dice: list | None = None


def plan(opts, task, rows: pd.DataFrame, where: str) -> Plan:
    """Parse and check --subgroups, --age-bands and --aggregate against the rows to score (before the long part)."""
    edges = S.parse_age_bands(getattr(opts, "age_bands", None))
    names = S.parse_subgroups(getattr(opts, "subgroups", None))
    S.check_named(names, rows, edges, where)
    aggregate = getattr(opts, "aggregate", "image") or "image"
    if aggregate == "patient":
        if not task.classifies:
            raise ConfigError("--aggregate patient averages class probabilities per patient; this model does not "
                              "classify.")
        if not (PT.ids_of(rows) != "").any():
            raise ConfigError(f"--aggregate patient: no image of {where} has a patient ID (the manifest's "
                              f"patient_id column is absent or empty; index the data with patient metadata).")
    return Plan(names, edges, aggregate)


def with_metadata(pred: pd.DataFrame, rows: pd.DataFrame, pl: Plan | None) -> pd.DataFrame:
    """predictions.csv with the rows' metadata columns (and age_band) after its own."""
    meta = S.metadata_columns(rows, pl.edges if pl else S.DEFAULT_AGE_BANDS)
    return pd.concat([pred.reset_index(drop=True), meta.drop(columns=[c for c in meta if c in pred])], axis=1)


def _scored(rows: pd.DataFrame, sc: Scores, classes: list[str]) -> S.Scored:
    dice = None
    if sc.dice_rows is not None:
        dice = np.full(len(rows), np.nan)
        dice[np.asarray(sc.dice_rows, int)] = np.asarray(sc.dice, float)
    strata = sc.y if sc.y is not None else rows["label"].astype(str).to_numpy()
    return S.Scored(np.asarray(strata), list(classes), sc.y, sc.probs, dice)


def _line(sub: dict) -> str:
    parts = []
    for attr, a in sub["by_attribute"].items():
        key = next((k for k in ("macro_auc", "covid_sensitivity", "dice") if k in a["gaps"]), None)
        g = a["gaps"].get(key) or {}
        gap = (f", largest {key} gap {g['value']:.3f} ({g['high_group']} vs {g['low_group']})"
               if g.get("value") is not None else "")
        small = sum(x["small"] for x in a["groups"])
        parts.append(f"{attr}: {len(a['groups'])} subgroups{f' ({small} small)' if small else ''}{gap}")
    return "subgroups: " + "; ".join(parts) + " (subgroups.png)"


def score(pl: Plan, m: dict, rows: pd.DataFrame, sc: Scores, classes: list[str], bootstrap: int, seed: int,
          out: Path, context: str, log, warnings: list[str]) -> None:
    """metrics.json ``subgroups`` and ``patient_level``, subgroups.png and patient_predictions.csv."""
    m["subgroups"], m["patient_level"] = None, None
    if pl.subgroups != []:
        s = _scored(rows, sc, classes)
        attrs = S.choose(pl.subgroups, rows, pl.edges)
        m["subgroups"] = S.subgroups(s, rows, attrs, pl.edges, bootstrap, seed)
        if attrs and plot_forest(m["subgroups"], out / "subgroups.png", context):
            log(_line(m["subgroups"]))
    if pl.aggregate == "patient" and sc.y is not None:
        m["patient_level"], notes = PT.patient_level(PT.ids_of(rows), sc.y, sc.probs, classes, bootstrap, seed, out)
        warnings += notes
        f = m["patient_level"]["figures"] or {}
        if "accuracy" in f:
            auc = "n/a" if f["macro_auc"] is None else f"{f['macro_auc']:.4f}"
            log(f"patient level ({m['patient_level']['n_patients']} patients): accuracy {f['accuracy']:.4f}, "
                f"macro-F1 {f['macro_f1']:.4f}, macro-AUC {auc} (patient_predictions.csv)")

"""Subgroup figures: how the model does by view, sex, age band, site and scanner maker.

The attributes are the manifest's metadata columns (``covidcxr.data.metadata``) but the IDs:
``view``, ``sex``, ``age`` (in bands: ``<40``, ``40-59``, ``60-79``, ``80+`` by default, ``--age-bands``;
``40-59`` holds ages from 40 up to, not including, 60), ``site`` and ``manufacturer``. Every value is its
own subgroup, "unknown" too (shown last, never dropped). A subgroup of fewer than ``MIN_N`` images is
shown and flagged ``"small": true``, never hidden.

Definitions (each recomputes from predictions.csv plus its metadata columns; the point figures
are sklearn's, the bootstrap uses the same definitions in numpy):

- ``accuracy``: ``accuracy_score(y, argmax)``.
- ``macro_f1``: ``f1_score(y, argmax, labels=P, average="macro", zero_division=0)`` over the classes
  ``P`` that occur among the subgroup's true labels (a class a subgroup has no images of would add a
  0 and make subgroups with fewer classes look worse).
- ``macro_auc``: the mean over ``P`` of one-vs-rest ``roc_auc_score(y == c, p_c)``; null when the subgroup
  holds one class only.
- ``covid_sensitivity`` / ``covid_specificity``: of the COVID-19 class (``metrics.covid_class``; absent
  without one): the share of its images predicted COVID / of the other images predicted not COVID;
  null when the subgroup has no COVID (no other) images.
- ``dice`` (segmentation and multi-task models): the mean per-image Dice of the images with a mask
  (``evaluation.segscore``, at each mask's native resolution).

Intervals: 95% percentile intervals from ``--bootstrap`` replicates (``--seed``), each replicate
redrawing, with replacement, every true class's images within every subgroup: one joint draw per
attribute, so that each subgroup's interval and each gap's come from the same replicates.

Gap: per attribute and metric, the largest difference between two known subgroups ("unknown" is
a mix of patients, not a population, and is not a side of a gap), ``high_group`` minus ``low_group``
as ranked by the point figures, with the interval of that same difference over the replicates (it
may include 0; the pair is chosen on the data, so it leans optimistic about the size of the gap).

``metrics.json`` ``subgroups`` (None with ``--subgroups none``)::

    {"attributes": ["view", "sex", "age"], "min_n": 30, "age_bands": {"edges": [40, 60, 80],
     "labels": ["<40", "40-59", "60-79", "80+"]}, "metrics": ["accuracy", ...], "bootstrap": 1000,
     "covid_class": "COVID" | null, "note": text (only when no attribute has data),
     "overall": {"n": 300, "metrics": {METRIC: {"value": float | null, "ci95": CI | null,
                                                "reason": null | why it is null}}},
     "by_attribute": {"view": {"groups": [{"value": "PA", "n": 120, "small": false,
                                           "classes": {"COVID": 30, ...}, "metrics": {METRIC: ...}}, ...],
                               "gaps": {METRIC: {"value": 0.12, "high_group": "PA", "low_group": "AP",
                                                 "ci95": CI | null, "involves_small": false,
                                                 "reason": null | why there is none}}}}}

where CI is ``{"low", "high", "n"}`` (``n``: replicates) as everywhere in metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from covidcxr.data.metadata import COLUMNS, ID_COLUMNS, UNKNOWN
from covidcxr.errors import ConfigError
from covidcxr.metrics import covid_class

ATTRIBUTES = tuple(c for c in COLUMNS if c not in ID_COLUMNS)   # view, sex, age, site, manufacturer
DEFAULT_AGE_BANDS = (40, 60, 80)
MIN_N = 30
CLASS_METRICS = ("accuracy", "macro_f1", "macro_auc", "covid_sensitivity", "covid_specificity")


# ---------------------------------------------------------------- flags and columns


def parse_age_bands(text: str | None) -> tuple[int, ...]:
    """``"40,60,80"`` -> (40, 60, 80): whole years, increasing, above 0."""
    if text is None or not str(text).strip():
        return DEFAULT_AGE_BANDS
    try:
        edges = tuple(int(t.strip()) for t in str(text).split(","))
    except ValueError:
        edges = ()
    if not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"--age-bands {text!r}: give increasing whole years above 0, comma-separated "
                          f"(e.g. 40,60,80 for <40, 40-59, 60-79, 80+).")
    return edges


def band_labels(edges: tuple[int, ...]) -> list[str]:
    inner = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
    return [f"<{edges[0]}"] + inner + [f"{edges[-1]}+"]


def age_band(values, edges: tuple[int, ...]) -> np.ndarray:
    """Each age (years, as text) in its band's label; "unknown" where absent or not a number >= 0."""
    age = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(float)
    labels = np.array(band_labels(edges), dtype=object)
    ok = np.isfinite(age) & (age >= 0)
    out = np.full(len(age), UNKNOWN, dtype=object)
    out[ok] = labels[np.searchsorted(np.asarray(edges, float), age[ok], side="right")]
    return out


def values_of(rows: pd.DataFrame, attr: str, edges: tuple[int, ...]) -> np.ndarray:
    """The subgroup value of every row for ``attr`` ("unknown" where the column is absent or empty)."""
    if attr not in rows:
        return np.full(len(rows), UNKNOWN, dtype=object)
    if attr == "age":
        return age_band(rows["age"], edges)
    v = rows[attr].astype(str).str.strip().to_numpy(dtype=object)
    return np.where(v == "", UNKNOWN, v)


def known(rows: pd.DataFrame, attr: str, edges: tuple[int, ...]) -> bool:
    return bool((values_of(rows, attr, edges) != UNKNOWN).any())


def parse_subgroups(text: str | None) -> list[str] | None:
    """None: the default (every attribute with data); [] for "none"; else the named attributes."""
    if text is None:
        return None
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in ATTRIBUTES]
    if not names or bad:
        raise ConfigError(f"--subgroups {text!r}: {', '.join(bad) or 'nothing named'} is not a subgroup "
                          f"attribute; choose from {', '.join(ATTRIBUTES)} (comma-separated), or 'none'.")
    return list(dict.fromkeys(names))


def check_named(names: list[str] | None, rows: pd.DataFrame, edges: tuple[int, ...], where: str) -> None:
    """Refuse a named attribute that no row to score has a value of."""
    empty = [n for n in names or [] if not known(rows, n, edges)]
    if empty:
        have = [a for a in ATTRIBUTES if known(rows, a, edges)]
        raise ConfigError(f"--subgroups: no image of {where} has a known {', '.join(empty)} (column "
                          f"{'absent' if empty[0] not in rows else 'empty or all unknown'}); attributes with "
                          f"data here: {', '.join(have) or 'none'}.")


def choose(names: list[str] | None, rows: pd.DataFrame, edges: tuple[int, ...]) -> list[str]:
    return [a for a in ATTRIBUTES if known(rows, a, edges)] if names is None else list(names)


def order(values: np.ndarray, attr: str, edges: tuple[int, ...]) -> list[str]:
    """Known values (age bands in band order, others sorted), then "unknown"."""
    present = set(values.tolist())
    ranked = band_labels(edges) if attr == "age" else sorted(present - {UNKNOWN})
    return [v for v in ranked if v in present] + ([UNKNOWN] if UNKNOWN in present else [])


# ---------------------------------------------------------------- the figures of one set of images


@dataclass
class Scored:
    """What was scored, per image: true class indices and probabilities (classifiers), Dice (NaN: no
    mask; segmenters) and the bootstrap strata (the true label)."""

    strata: np.ndarray
    classes: list[str]
    y: np.ndarray | None = None
    probs: np.ndarray | None = None
    dice: np.ndarray | None = None

    def __post_init__(self):
        self.pred = None if self.probs is None else np.asarray(self.probs).argmax(axis=1)

    @property
    def covid(self) -> int | None:
        c = covid_class(self.classes) if self.y is not None else None
        return None if c is None else self.classes.index(c)

    def metric_names(self) -> list[str]:
        names = [] if self.y is None else [m for m in CLASS_METRICS
                                           if self.covid is not None or not m.startswith("covid")]
        return names + (["dice"] if self.dice is not None else [])


def _entry(value, reason=None) -> dict:
    return {"value": None if value is None else float(value), "ci95": None, "reason": None if value is not None
            else reason}


def point(s: Scored, idx: np.ndarray) -> dict:
    """Every metric of the images ``idx`` (sklearn), null with the reason where it cannot be computed."""
    out = {}
    if s.y is not None:
        y, p = s.y[idx], s.probs[idx]
        pred, present = p.argmax(axis=1), np.unique(y)
        out["accuracy"] = _entry(skm.accuracy_score(y, pred))
        out["macro_f1"] = _entry(skm.f1_score(y, pred, labels=present, average="macro", zero_division=0))
        out["macro_auc"] = (_entry(np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present]))
                            if len(present) > 1 else
                            _entry(None, f"one class only ({s.classes[present[0]]}): AUC ranks images of a class "
                                         f"against images of other classes"))
        c = s.covid
        if c is not None:
            name = s.classes[c]
            out["covid_sensitivity"] = (_entry(np.mean(pred[y == c] == c)) if (y == c).any()
                                        else _entry(None, f"no {name} images in this subgroup"))
            out["covid_specificity"] = (_entry(np.mean(pred[y != c] != c)) if (y != c).any()
                                        else _entry(None, f"only {name} images in this subgroup"))
    if s.dice is not None:
        d = s.dice[idx]
        d = d[np.isfinite(d)]
        out["dice"] = _entry(d.mean() if len(d) else None, "no image of this subgroup has a readable mask")
    return out


def _auc(yb: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC, ties counted one half (sklearn's roc_auc_score), by sorted counting."""
    pos, neg = score[yb], np.sort(score[~yb])
    if not len(pos) or not len(neg):
        return float("nan")
    below, upto = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float((below.sum() + 0.5 * (upto - below).sum()) / (len(pos) * len(neg)))


def fast(s: Scored, idx: np.ndarray, present: np.ndarray) -> dict:
    """``point``'s figures (NaN where undefined) in numpy, for the bootstrap; ``present``: the classes of the
    subgroup itself (a stratified replicate has the same ones)."""
    out = {}
    if s.y is not None:
        y, p, k = s.y[idx], s.probs[idx], len(s.classes)
        pred = s.pred[idx]
        tp = np.bincount(y[pred == y], minlength=k)
        f1 = 2 * tp[present] / (np.bincount(pred, minlength=k)[present] + np.bincount(y, minlength=k)[present])
        out.update(accuracy=float(tp.sum() / len(y)), macro_f1=float(f1.mean()),
                   macro_auc=float(np.mean([_auc(y == c, p[:, c]) for c in present])) if len(present) > 1
                   else float("nan"))
        c = s.covid
        if c is not None:
            pos = y == c
            out["covid_sensitivity"] = float(np.mean(pred[pos] == c)) if pos.any() else float("nan")
            out["covid_specificity"] = float(np.mean(pred[~pos] != c)) if (~pos).any() else float("nan")
    if s.dice is not None:
        d = s.dice[idx]
        d = d[np.isfinite(d)]
        out["dice"] = float(d.mean()) if len(d) else float("nan")
    return out


def _interval(reps, n: int, level: float = 0.95) -> dict | None:
    v = np.asarray(reps, float)
    v = v[np.isfinite(v)]
    a = (1 - level) / 2
    return {"low": float(np.quantile(v, a)), "high": float(np.quantile(v, 1 - a)), "n": int(n)} if len(v) else None


# ---------------------------------------------------------------- subgroups, replicates and gaps


def _replicates(s: Scored, groups: list[np.ndarray], n: int, seed: int) -> list[dict]:
    """Per group, {metric: [value per replicate]}: one joint stratified draw per replicate."""
    rng = np.random.default_rng(seed)
    strata = [[g[s.strata[g] == k] for k in np.unique(s.strata[g])] for g in groups]
    present = [np.unique(s.y[g]) if s.y is not None else None for g in groups]
    reps = [{} for _ in groups]
    for _ in range(n):
        for j, parts in enumerate(strata):
            idx = np.concatenate([part[rng.integers(0, len(part), len(part))] for part in parts])
            for k, v in fast(s, idx, present[j]).items():
                reps[j].setdefault(k, []).append(v)
    return reps


def _group(s: Scored, value: str, idx: np.ndarray) -> dict:
    labels = s.strata[idx] if s.y is None else np.asarray(s.classes, object)[s.y[idx]]
    classes = {str(k): int((labels == k).sum()) for k in np.unique(labels)}
    return {"value": value, "n": int(len(idx)), "small": bool(len(idx) < MIN_N), "classes": classes,
            "metrics": point(s, idx)}


def _gap(groups: list[dict], reps: list[dict], metric: str, n: int) -> dict:
    """The largest difference of ``metric`` between two known subgroups, with the interval of that difference."""
    have = [j for j, g in enumerate(groups) if g["value"] != UNKNOWN and g["metrics"][metric]["value"] is not None]
    if len(have) < 2:
        return {"value": None, "high_group": None, "low_group": None, "ci95": None, "involves_small": False,
                "reason": "fewer than two known subgroups where it can be computed"}
    vals = [groups[j]["metrics"][metric]["value"] for j in have]
    order = np.argsort(vals, kind="stable")        # ties: two distinct subgroups all the same (gap 0)
    hi, lo = have[int(order[-1])], have[int(order[0])]
    diff = (np.asarray(reps[hi][metric]) - np.asarray(reps[lo][metric])) if n else []
    return {"value": float(max(vals) - min(vals)), "high_group": groups[hi]["value"],
            "low_group": groups[lo]["value"], "ci95": _interval(diff, n) if n else None,
            "involves_small": bool(groups[hi]["small"] or groups[lo]["small"]), "reason": None}


def _with_intervals(entries: list[dict], reps: list[dict], n: int) -> None:
    for g, r in zip(entries, reps):
        for k, e in g["metrics"].items():
            if n and e["value"] is not None:
                e["ci95"] = _interval(r.get(k, []), n)


def attribute(s: Scored, values: np.ndarray, names: list[str], n: int, seed: int) -> dict:
    """``by_attribute[attr]``: every subgroup with its figures and intervals, and the gaps."""
    idxs = [np.flatnonzero(values == v) for v in names]
    groups = [_group(s, v, i) for v, i in zip(names, idxs)]
    reps = _replicates(s, idxs, n, seed) if n else [{} for _ in idxs]
    _with_intervals(groups, reps, n)
    return {"groups": groups, "gaps": {k: _gap(groups, reps, k, n) for k in s.metric_names()}}


def overall(s: Scored, n: int, seed: int) -> dict:
    idx = np.arange(len(s.strata))
    entry = {"n": int(len(idx)), "metrics": point(s, idx)}
    reps = _replicates(s, [idx], n, seed) if n else [{}]
    _with_intervals([entry], reps, n)
    return entry


def subgroups(s: Scored, rows: pd.DataFrame, attrs: list[str], edges: tuple[int, ...], n: int,
              seed: int) -> dict:
    """The ``subgroups`` entry of metrics.json (schema above) for the scored ``rows`` (aligned with ``s``)."""
    out = {"attributes": list(attrs), "min_n": MIN_N,
           "age_bands": {"edges": list(edges), "labels": band_labels(edges)},
           "metrics": s.metric_names(), "bootstrap": int(n),
           "covid_class": None if s.covid is None else s.classes[s.covid],
           "overall": overall(s, n, seed), "by_attribute": {}}
    if not attrs:
        out["note"] = ("no metadata column (view, sex, age, site, manufacturer) has a known value among the scored "
                       "images")
    for a in attrs:
        values = values_of(rows, a, edges)
        out["by_attribute"][a] = attribute(s, values, order(values, a, edges), n, seed)
    return out


def metadata_columns(rows: pd.DataFrame, edges: tuple[int, ...]) -> pd.DataFrame:
    """The metadata columns the rows have (predictions.csv's last columns), and ``age_band`` beside ``age``."""
    cols = {c: rows[c].astype(str).to_numpy() for c in COLUMNS if c in rows}
    if "age" in cols:
        cols["age_band"] = age_band(cols["age"], edges)
    return pd.DataFrame(cols, index=range(len(rows)))

"""Operating points: one class's threshold on its one-vs-rest probability, chosen on validation
images and applied unchanged elsewhere (pure numpy; ``covidcxr.evaluate --operating-point``,
``covidcxr.predict --operating-point``).

A SPEC is ``[CLASS:]RULE``:

- ``sensitivity=S``: the highest threshold whose validation sensitivity is at least S;
- ``specificity=S``: the lowest threshold whose validation specificity is at least S;
- ``youden``: the threshold of the largest sensitivity + specificity - 1 (ties: the highest);
- ``threshold=T``: T itself, chosen on nothing.

Without CLASS the rule is for the COVID-19 class (``metrics.covid_class``); an empty SPEC is
``COVID:sensitivity=0.95``. An image is flagged (called positive for CLASS) when its probability
of CLASS is at least the threshold: ``p >= t``, the convention of sklearn's ``roc_curve``. The
candidate thresholds are the distinct validation probabilities of CLASS plus one just above the
highest (nothing flagged), so a chosen threshold is always one of the validation scores or that
one; the figures at a threshold are the same whatever lies between two scores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidcxr.errors import ConfigError
from covidcxr.metrics import covid_class

RULES = ("sensitivity", "specificity", "youden", "threshold")
DEFAULT = "sensitivity=0.95"
FIGURES = ("sensitivity", "specificity", "ppv", "npv")
FORMAT = "covidcxr.operating_point/1"


@dataclass(frozen=True)
class Spec:
    cls: str
    rule: str               # one of RULES
    value: float | None     # None for youden

    @property
    def chosen(self) -> bool:
        """True when the threshold is chosen on validation images (every rule but ``threshold=``)."""
        return self.rule != "threshold"

    @property
    def text(self) -> str:
        return f"{self.cls}:{self.rule}" + ("" if self.value is None else f"={self.value:g}")


def parse_spec(text: str | None, classes: list[str], flag: str = "--operating-point") -> Spec:
    """The Spec of ``text`` for a model of ``classes``; ConfigError (one line) for anything wrong."""
    bare, text = not (text or "").strip(), (text or "").strip() or DEFAULT
    cls, _, rule = text.rpartition(":") if ":" in text else ("", "", text)
    cls = cls.strip() or covid_class(list(classes))
    if cls is None:
        raise ConfigError(f"{flag} {'(bare: the COVID class at ' + DEFAULT + ')' if bare else text}: the model has "
                          f"no COVID class ({', '.join(classes)}); name one, e.g. {flag} {classes[-1]}:{DEFAULT}.")
    if cls not in classes:
        raise ConfigError(f"{flag} {text}: the model has no class '{cls}' (its classes: {', '.join(classes)}).")
    name, eq, value = rule.strip().partition("=")
    name = name.strip().lower()
    if name not in RULES or bool(eq) == (name == "youden"):
        raise ConfigError(f"{flag} {text}: not a rule; use CLASS:sensitivity=S, CLASS:specificity=S, CLASS:youden "
                          f"or CLASS:threshold=T.")
    if name == "youden":
        return Spec(cls, name, None)
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"{flag} {text}: '{value}' is not a number.") from None
    low_ok = v >= 0 if name == "threshold" else v > 0
    if not (np.isfinite(v) and low_ok and v <= 1):
        raise ConfigError(f"{flag} {text}: {name} must be " + ("between 0 and 1." if name == "threshold" else
                                                                "above 0 and at most 1."))
    return Spec(cls, name, v)


# ------------------------------------------------------------------ figures at a threshold

def counts(positive: np.ndarray, score: np.ndarray, t: float) -> dict:
    """The 2x2 confusion counts of flagging ``score >= t`` against the boolean truth ``positive``."""
    positive, hit = np.asarray(positive, bool), np.asarray(score, np.float64) >= t
    return {"tp": int(np.sum(hit & positive)), "fn": int(np.sum(~hit & positive)),
            "fp": int(np.sum(hit & ~positive)), "tn": int(np.sum(~hit & ~positive))}


def _ratio(a: int, b: int) -> float | None:
    return float(a / (a + b)) if a + b else None


def rates(c: dict) -> dict:
    """Sensitivity, specificity, PPV and NPV of confusion counts (None where undefined)."""
    return {"sensitivity": _ratio(c["tp"], c["fn"]), "specificity": _ratio(c["tn"], c["fp"]),
            "ppv": _ratio(c["tp"], c["fp"]), "npv": _ratio(c["tn"], c["fn"])}


def at(positive: np.ndarray, score: np.ndarray, t: float) -> dict:
    """Every figure at threshold ``t``: n, positives, the rates and the confusion matrix
    (``matrix``: rows true positive / true negative, columns flagged / not flagged)."""
    c = counts(positive, score, t)
    return {"n": int(len(np.asarray(score))), "positives": c["tp"] + c["fn"], **rates(c), "confusion": c,
            "matrix": [[c["tp"], c["fn"]], [c["fp"], c["tn"]]]}


def candidates(score: np.ndarray) -> np.ndarray:
    """Distinct scores, highest first, after one just above the highest (which flags nothing)."""
    u = np.unique(np.asarray(score, np.float64))[::-1]
    return np.concatenate([[np.nextafter(u[0], np.inf) if len(u) else 1.0], u])


def choose(spec: Spec, positive: np.ndarray, score: np.ndarray) -> float:
    """The threshold of ``spec`` on these validation images (see the module docstring for each rule)."""
    if not spec.chosen:
        return float(spec.value)
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ConfigError(f"--operating-point {spec.text}: the validation images hold {n_pos} {spec.cls} and "
                          f"{n_neg} other image(s); choosing needs both.")
    thr = candidates(score)
    order = np.argsort(-score, kind="stable")
    flagged = np.searchsorted(-score[order], -thr, side="right")      # images with score >= t, per candidate
    tp = np.concatenate([[0], np.cumsum(positive[order])])[flagged]
    sens, spec_ = tp / n_pos, 1 - (flagged - tp) / n_neg
    if spec.rule == "sensitivity":
        ok = np.flatnonzero(sens >= spec.value - 1e-12)
        return float(thr[ok[0]])                                      # highest such threshold
    if spec.rule == "specificity":
        ok = np.flatnonzero(spec_ >= spec.value - 1e-12)
        return float(thr[ok[-1]])                                     # lowest such threshold
    return float(thr[int(np.argmax(sens + spec_ - 1))])               # youden; ties: the highest threshold


def bootstrap(y: np.ndarray, positive: np.ndarray, score: np.ndarray, t: float, n: int, seed: int,
              level: float = 0.95) -> dict | None:
    """Percentile intervals of the four rates at ``t``, by the bootstrap of ``metrics.bootstrap_ci``:
    each replicate resamples, with replacement, the same number of images of every true class ``y``.
    {figure: {"low", "high", "n"} or None}; None for ``n == 0``."""
    if not n:
        return None
    y, positive = np.asarray(y), np.asarray(positive, bool)
    hit = np.asarray(score, np.float64) >= t
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    reps = {k: [] for k in FIGURES}
    for _ in range(n):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        p, h = positive[idx], hit[idx]
        r = rates({"tp": int(np.sum(h & p)), "fn": int(np.sum(~h & p)), "fp": int(np.sum(h & ~p)),
                   "tn": int(np.sum(~h & ~p))})
        for k in FIGURES:
            reps[k].append(np.nan if r[k] is None else r[k])
    a, out = (1 - level) / 2, {}
    for k, vals in reps.items():
        v = np.asarray(vals)[np.isfinite(vals)]
        out[k] = {"low": float(np.quantile(v, a)), "high": float(np.quantile(v, 1 - a)), "n": int(n)} if len(v) else None
    return out


# ------------------------------------------------------------------ operating_point.json

def flag_column(cls: str) -> str:
    return f"flag_{cls}"


def save(path: str | Path, op: dict) -> Path:
    """``operating_point.json``: the class, threshold and rule, and the validation figures it was chosen on."""
    keep = ("class", "rule", "spec", "threshold", "decision", "probabilities", "chosen_on", "validation")
    path = Path(path)
    path.write_text(json.dumps({"format": FORMAT, **{k: op.get(k) for k in keep}}, indent=2))
    return path


def load(path: str | Path, classes: list[str]) -> tuple[str, float]:
    """(class, threshold) of an operating_point.json, checked against a model of ``classes``."""
    try:
        doc = json.loads(Path(path).read_text())
        cls, t = doc["class"], float(doc["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--operating-point {path}: not an operating_point.json ({exc}).") from None
    if cls not in classes:
        raise ConfigError(f"--operating-point {path}: its class '{cls}' is not a class of this model "
                          f"({', '.join(classes)}).")
    if not np.isfinite(t):
        raise ConfigError(f"--operating-point {path}: threshold {t} is not a number.")
    return cls, t

"""The TRIPOD+AI (Collins et al., BMJ 2024) and CLAIM 2024 (Tejani et al., Radiology: AI 2024) items a
covidcxr card can answer, each with a link to where the card answers it, or "not reported".

Items are named by their topic (check the item numbers against the checklist version you submit):
what only the authors know (ethics, funding, registration, annotators...) is always "not reported".
"""
from __future__ import annotations

from covidcxr.modelcard.results import NOT, table


def _evals(f: dict) -> list[dict]:
    return f.get("evaluations") or []


def _any(f: dict, key: str) -> bool:
    return any(e.get(key) for e in _evals(f))


def _has_ci(f: dict) -> bool:
    return any(e.get("ci95") or (e.get("segmentation") or {}).get("ci95") for e in _evals(f))


def _meta(f: dict) -> list[str]:
    return ((f.get("data") or {}).get("metadata") or {}).get("columns") or []


def _split(f: dict) -> dict:
    return (f.get("data") or {}).get("split") or {}


# (guideline, topic, answered?(facts), section slug)
ITEMS = (
    ("both", "Data sources", lambda f: (f.get("data") or {}).get("source"), "training-data"),
    ("both", "Eligibility: images left out, and why", lambda f: f.get("data"), "training-data"),
    ("both", "Data preparation / preprocessing", lambda f: f.get("model"), "preprocessing"),
    ("TRIPOD+AI", "Outcome: the classes predicted", lambda f: f.get("model"), "model"),
    ("both", "Sample size: images per class and split", lambda f: (f.get("data") or {}).get("counts"), "training-data"),
    ("both", "Missing data (unreadable files)", lambda f: f.get("data"), "training-data"),
    ("both", "How data were split; level at which partitions are disjoint",
     lambda f: _split(f).get("seed") is not None, "training-data"),
    ("CLAIM", "Patient-level partitions", lambda f: _split(f).get("patients"), "training-data"),
    ("both", "Model description, software and initialisation", lambda f: f.get("model"), "model"),
    ("both", "Training details, hyperparameters, selection of the final model", lambda f: f.get("training"),
     "training"),
    ("TRIPOD+AI", "Class imbalance", lambda f: "class_weights" in ((f.get("training") or {}).get("settings") or {}),
     "training"),
    ("both", "Performance measures", lambda f: f.get("internal") or _evals(f), "results"),
    ("both", "Uncertainty: confidence intervals", _has_ci, "results"),
    ("both", "Internal and external evaluation", lambda f: _evals(f), "results"),
    ("TRIPOD+AI", "Calibration / recalibration", lambda f: _any(f, "calibration"), "results"),
    ("TRIPOD+AI", "Fairness: performance in subgroups", lambda f: _any(f, "subgroups"), "results"),
    ("TRIPOD+AI", "Heterogeneity across sites", lambda f: _any(f, "site_probe") or "site" in _meta(f), "probes"),
    ("TRIPOD+AI", "Model output and decision threshold", lambda f: _any(f, "operating_point"), "results"),
    ("both", "Participant characteristics (view, sex, age, site)", lambda f: _meta(f), "training-data"),
    ("CLAIM", "Robustness and shortcut analysis", lambda f: _any(f, "mask_lungs") or _any(f, "site_probe")
     or _any(f, "tta"), "probes"),
    ("CLAIM", "Failure analysis", lambda f: _evals(f), "known-limitations"),
    ("both", "Limitations", lambda f: True, "known-limitations"),
    ("both", "Intended use", lambda f: True, "intended-use"),
    ("both", "Code availability", lambda f: True, "model"),
    ("both", "Ground truth definition, annotators and their agreement", lambda f: False, ""),
    ("CLAIM", "De-identification", lambda f: False, ""),
    ("both", "Ethical approval, funding, conflicts of interest", lambda f: False, ""),
    ("both", "Protocol and registration", lambda f: False, ""),
    ("TRIPOD+AI", "Patient and public involvement", lambda f: False, ""),
)


def render(facts: dict, titles: dict[str, str]) -> str:
    """The table: ``titles`` maps a section slug to its heading text."""
    rows = []
    for guide, topic, answered, where in ITEMS:
        ok = bool(answered(facts)) and where
        g = "TRIPOD+AI, CLAIM 2024" if guide == "both" else ("CLAIM 2024" if guide == "CLAIM" else guide)
        rows.append([topic, g, f"[{titles.get(where, where)}](#{where})" if ok else NOT])
    return table(["item", "checklist", "answered in"], rows)

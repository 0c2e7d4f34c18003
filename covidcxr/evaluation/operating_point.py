"""``evaluate --operating-point``: a threshold chosen on the validation split (the images the
temperature is fitted on) and applied unchanged to the scored split, with its figures and CIs, the
validation figures it was chosen with, ``operating_point.json`` (in the evaluation folder, and
beside the model like calibration.json), the ROC point, the report table and the console line.

Thresholds apply to the model's own (uncalibrated) probabilities, the ``prob_<class>`` columns of
predictions.csv: temperature scaling of several classes is not monotone in one class's probability,
so a threshold on calibrated probabilities would flag other images. ``predict --operating-point``
flags on the same uncalibrated probability, with or without ``--calibrated``.
"""
from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import artifacts as A
from covidcxr import operating as OP
from covidcxr.errors import ConfigError
from covidcxr.evaluation import figures as F
from covidcxr.evaluation.passes import forward

PROBABILITIES = "uncalibrated model probabilities (predictions.csv prob_<class>)"


def check_split(spec: OP.Spec, val: pd.DataFrame | None, note: str, scored: pd.DataFrame, split: str) -> None:
    """Before anything runs: a chosen rule needs validation images, none of them among the scored ones."""
    if not spec.chosen:
        return
    if val is None:
        raise ConfigError(f"--operating-point {spec.text}: {note}, so there is nothing to choose the threshold on; "
                          f"pass data with a val split or a run folder, or fix it: --operating-point "
                          f"{spec.cls}:threshold=T.")
    norm = (lambda s: {os.path.abspath(p) for p in s})  # noqa: E731
    shared = norm(val["path"]) & norm(scored["path"])
    if shared:
        raise ConfigError(f"--operating-point {spec.text}: the threshold is chosen on the validation split and "
                          f"{len(shared)} of the {len(scored)} images of split '{split}' are validation images: "
                          f"choosing on the split being scored is refused; score another split (--split test) "
                          f"or fix the threshold: --operating-point {spec.cls}:threshold=T.")


def validation_scores(predictor, df: pd.DataFrame, classes: list[str], note: str, quiet: bool) -> dict:
    """{"y", "probs", "n", "note"}: one forward pass over the validation rows of the model's classes."""
    df = df[df["label"].isin(classes)].reset_index(drop=True)
    p = forward(predictor, df, quiet=quiet, desc="validation split")
    probs = p.probs if p.probs is not None else np.zeros((0, len(classes)))
    return {"y": F.label_index(df["label"].iloc[p.rows], classes), "probs": probs, "n": len(p.rows), "note": note}


def operating_point(spec: OP.Spec, classes: list[str], y: np.ndarray, probs: np.ndarray, val: dict | None,
                    bootstrap: int, seed: int) -> dict:
    """The metrics.json ``operating_point``: the threshold (chosen on ``val`` unless fixed), the scored
    images' figures at it with bootstrap CIs, and the validation figures at it."""
    k = classes.index(spec.cls)
    if spec.chosen:
        t = OP.choose(spec, val["y"] == k, val["probs"][:, k])
    else:
        t = float(spec.value)
    y, score = np.asarray(y, int), np.asarray(probs, np.float64)[:, k]
    return {"class": spec.cls, "rule": spec.rule, "spec": spec.text, "threshold": t,
            "decision": f"flag when p({spec.cls}) >= threshold", "probabilities": PROBABILITIES,
            "chosen_on": (val["note"] + f" (n={val['n']})") if spec.chosen else None,
            "validation": OP.at(val["y"] == k, val["probs"][:, k], t) if val and val["n"] else None,
            **OP.at(y == k, score, t), "ci95": OP.bootstrap(y, y == k, score, t, bootstrap, seed)}


def roc_point(op: dict | None) -> dict | None:
    """The point plots.plot_roc marks: the class, its false and true positive rates, a legend label."""
    if not op or op["sensitivity"] is None or op["specificity"] is None:
        return None
    return {"class": op["class"], "fpr": 1 - op["specificity"], "tpr": op["sensitivity"],
            "label": f"operating point {op['spec']} (t={op['threshold']:.3g})"}


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _with_ci(op: dict, key: str) -> str:
    c = (op.get("ci95") or {}).get(key)
    return _f(op[key]) + (f" [{_f(c['low'])}, {_f(c['high'])}]" if c else "")


def console_line(op: dict) -> str:
    c = op["confusion"]
    return (f"operating point {op['spec']}: threshold {op['threshold']:.4g} on p({op['class']})"
            + (f", chosen on the {op['chosen_on']}" if op["chosen_on"] else " (fixed)") + ": "
            + ", ".join(f"{k} {_with_ci(op, k)}" for k in OP.FIGURES)
            + f" (TP {c['tp']}, FN {c['fn']}, FP {c['fp']}, TN {c['tn']})")


def html_section(op: dict | None) -> str:
    """The report's table: the figures on the scored split with CIs, and on validation."""
    if not op:
        return ""
    v = op.get("validation") or {}
    rows = "".join(f"<tr><th>{k.upper() if len(k) == 3 else k}</th><td>{_with_ci(op, k)}</td>"
                   f"<td>{_f(v.get(k))}</td></tr>" for k in OP.FIGURES)
    c, vc = op["confusion"], v.get("confusion") or {}
    rows += "".join(f"<tr><th>{name}</th><td>{c[k]}</td><td>{vc.get(k, 'n/a')}</td></tr>"
                    for k, name in (("tp", "true positives"), ("fn", "false negatives"), ("fp", "false positives"),
                                    ("tn", "true negatives")))
    how = f"chosen on the {op['chosen_on']}" if op["chosen_on"] else "fixed (not chosen)"
    return (f"<h2>Operating point: {html.escape(op['class'])}</h2><p>{html.escape(op['spec'])}: threshold "
            f"{op['threshold']:.4g}, {html.escape(how)}; {html.escape(op['decision'])}, on the "
            f"{html.escape(op['probabilities'])}.</p><table><tr><th></th><th>scored split (n={op['n']}, "
            f"{op['positives']} {html.escape(op['class'])})</th><th>validation"
            + (f" (n={v['n']})" if v else "") + f"</th></tr>{rows}</table>")


def beside_model(out: Path, root: Path, overwrite: bool, log=print) -> None:
    """Copy the evaluation's operating_point.json beside the model: when there is none yet, or with
    --overwrite (else a note), as calibration.json is."""
    src, dest = out / A.OPERATING_POINT, root / A.OPERATING_POINT
    if not src.exists() or not root.is_dir():
        return
    if not dest.exists() or overwrite:
        shutil.copy(src, dest)
        log(f"operating point saved to {dest} (predict --operating-point uses it)")
    else:
        log(f"note: {dest} exists; kept it (pass --overwrite to replace it with this operating point)")

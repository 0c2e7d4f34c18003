"""The site shortcut probe (DeGrave, Janizek and Lee, Nat. Mach. Intell. 2021): can the site an image
came from be read off the model's penultimate features, and does the site go with the label?

A cross-validated (stratified 5-fold, seeded) logistic regression on standardised penultimate
features predicts the site; its out-of-fold AUC (binary, or macro one-vs-rest for more sites) gets a
stratified bootstrap 95% interval. Cramér's V (with the chi-square p-value) measures how strongly site
and label go together in the scored images. The WARNING is given when both hold:

- the site is predictable: the AUC's interval lies above ``AUC_LOW`` (0.7; DeGrave et al. found
  COVID-19 sources told apart from radiographs alone with AUC near 1);
- the site is confounded with the label: V >= ``CRAMERS_V`` (0.1, Cohen's "small" association; below
  it the site carries almost no information about the label, so a site detector cannot pass for a
  disease detector) and p < ``P_VALUE`` (0.05), so that chance association in a small set (V of 0.1
  to 0.2 is common by chance with a few dozen images) does not raise it.

Needs the Keras model (a bare SavedModel has no penultimate layer to read): skipped with the reason.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from covidcxr.data.metadata import UNKNOWN
from covidcxr.evaluation.passes import items_of
from covidcxr.inference import ModelFile

AUC_LOW = 0.7
CRAMERS_V = 0.1
P_VALUE = 0.05
FOLDS = 5
REPLICATES = 200   # bootstrap replicates at least (whatever --bootstrap says), as for the lungs-out probe


def feature_model(model):
    """A Keras model from ``model``'s input to the input of its classifier head: the Dense layer named
    ``label`` (every covidcxr classifier and multi-task model), else the last Dense layer."""
    import keras

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    head = next((d for d in dense if d.name == "label"), dense[-1] if dense else None)
    if head is None:
        raise ValueError(f"{model.name} has no Dense classifier layer: no penultimate features to probe.")
    return keras.Model(model.inputs, head.input, name=f"{model.name}_penultimate")


def penultimate(predictor, df: pd.DataFrame, quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, D] float64, row indices into ``df`` that were read), the inputs exactly as the
    model sees them (``Predictor.run``: decoding, resizing, lung crop)."""
    from tqdm import tqdm

    fm, size = feature_model(predictor.model), predictor.batch_size
    feats, rows = [], []
    for batch in tqdm(predictor.run(items_of(df)), disable=quiet, desc="site probe features", unit="batch", delay=2):
        if not batch.done:
            continue
        x = batch.x
        pad = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x
        feats.append(np.asarray(fm.predict_on_batch(pad), np.float64)[:len(x)].reshape(len(x), -1))
        rows += [d.item.key for d in batch.done]
    order = np.argsort(rows, kind="stable")
    return (np.concatenate(feats)[order] if feats else np.zeros((0, 0))), np.asarray(rows, int)[order]


def cramers_v(a, b) -> dict:
    """Cramér's V between two categorical arrays (no continuity correction), with the chi-square test."""
    from scipy.stats import chi2_contingency

    table = pd.crosstab(pd.Series(np.asarray(a)), pd.Series(np.asarray(b))).to_numpy()
    n, k = int(table.sum()), min(table.shape) - 1
    if k < 1:
        return {"v": 0.0, "chi2": 0.0, "dof": 0, "p_value": 1.0, "n": n}
    chi2, p, dof, _ = chi2_contingency(table, correction=False)
    return {"v": float(np.sqrt(chi2 / (n * k))), "chi2": float(chi2), "dof": int(dof), "p_value": float(p), "n": n}


def _auc(y: np.ndarray, p: np.ndarray, k: int) -> float:
    from sklearn.metrics import roc_auc_score

    if k == 2:
        return float(roc_auc_score(y == 1, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(k)))


def out_of_fold(features: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """Out-of-fold site probabilities of a standardised logistic regression; (probs, folds used)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(FOLDS, np.bincount(y).min()))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(clf, features, y, cv=cv, method="predict_proba"), folds


def _interval(y: np.ndarray, p: np.ndarray, k: int, replicates: int, seed: int) -> dict:
    """Stratified (by site) bootstrap percentile 95% interval of the out-of-fold AUC."""
    rng = np.random.default_rng(seed)
    by = [np.flatnonzero(y == c) for c in range(k)]
    reps = [_auc(y[i], p[i], k) for i in (np.concatenate([rng.choice(g, len(g)) for g in by])
                                          for _ in range(replicates))]
    return {"low": float(np.percentile(reps, 2.5)), "high": float(np.percentile(reps, 97.5)), "n": int(replicates)}


def known_sites(site) -> tuple[np.ndarray, list[str], dict]:
    """(mask of usable rows, site names, left-out counts): unknown sites, and sites with fewer than 2
    images (too few for any cross-validation), are left out."""
    s = pd.Series(np.asarray(site, dtype=object)).fillna("").astype(str).str.strip()
    known = (s != "") & (s.str.lower() != UNKNOWN)
    counts = s[known].value_counts()
    few = set(counts[counts < 2].index)
    keep = known & ~s.isin(few)
    return keep.to_numpy(), sorted(s[keep].unique().tolist()), {"unknown_site": int((~known).sum()),
                                                                  "sites_under_2_images": int(s.isin(few).sum())}


def assess(features: np.ndarray, site, label, seed: int = 0, replicates: int = REPLICATES) -> dict:
    """The probe on given features (rows aligned with ``site`` and ``label``): AUC with CI, Cramér's V,
    verdict and, where it applies, the warning. Pure: no model needed."""
    keep, sites, left_out = known_sites(site)
    if len(sites) < 2:
        return {"ran": False, "reason": f"fewer than 2 known sites with 2+ images ({', '.join(sites) or 'none'})",
                "sites": sites, "left_out": left_out}
    f, s, lab = np.asarray(features, float)[keep], np.asarray(site, dtype=object)[keep].astype(str), \
        np.asarray(label)[keep]
    y = np.searchsorted(sites, s)
    probs, folds = out_of_fold(f, y, seed)
    k = len(sites)
    auc, ci = _auc(y, probs, k), _interval(y, probs, k, max(int(replicates), REPLICATES), seed)
    assoc = cramers_v(s, lab)
    counts = {k: int(v) for k, v in pd.Series(s).value_counts().sort_index().items()}
    out = {"ran": True, "n": int(keep.sum()), "sites": sites, "site_counts": counts,
           "left_out": left_out, "features": int(f.shape[1]), "folds": folds, "seed": int(seed),
           "auc_kind": "binary" if k == 2 else "macro one-vs-rest", "auc": auc, "auc_ci95": ci, "cramers_v": assoc,
           "thresholds": {"auc_ci_low_above": AUC_LOW, "cramers_v_at_least": CRAMERS_V, "p_value_below": P_VALUE},
           "method": f"stratified {folds}-fold cross-validated logistic regression on standardised penultimate "
                     f"features (seed {seed}); out-of-fold AUC with a {ci['n']}-replicate stratified bootstrap "
                     f"95% interval"}
    out.update(verdict(auc, ci, assoc))
    return out


def verdict(auc: float, ci: dict, assoc: dict) -> dict:
    """{'predictable', 'confounded', 'verdict', 'warning' (None unless both)}."""
    predictable = ci["low"] > AUC_LOW
    confounded = assoc["v"] >= CRAMERS_V and assoc["p_value"] < P_VALUE
    figs = (f"site probe AUC {auc:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]; Cramér's V between site and label "
            f"{assoc['v']:.3f} (chi-square p={assoc['p_value']:.3g})")
    if predictable and confounded:
        text = (f"the site is predictable from the model's features and confounded with the label ({figs}): the "
                f"model may be recognising the hospital or scanner rather than the disease (DeGrave 2021). A "
                f"reviewer will ask for figures within each site, on a site held out from training, or on data "
                f"where the label does not go with the site.")
        return {"predictable": True, "confounded": True, "verdict": "WARNING: " + text, "warning": text}
    if predictable:
        text = (f"the site is predictable from the features but not confounded with the label here ({figs}): not "
                f"a shortcut on this data, but figures may shift on data whose label mix differs by site.")
    elif confounded:
        text = (f"site and label go together, but the site is not reliably predictable from the features "
                f"(interval not above {AUC_LOW}) ({figs}).")
    else:
        text = f"no sign of a site shortcut ({figs})."
    return {"predictable": bool(predictable), "confounded": bool(confounded), "verdict": text, "warning": None}


def probe(predictor, rows: pd.DataFrame, labels, seed: int, bootstrap: int, quiet: bool) -> dict | None:
    """The probe on the scored rows (None when they have no ``site`` column at all)."""
    if "site" not in rows:
        return None
    keep, sites, _ = known_sites(rows["site"])
    if len(sites) < 2:
        return {"ran": False, "reason": f"fewer than 2 known sites with 2+ images in the scored data "
                                        f"({', '.join(sites) or 'none'})", "sites": sites}
    if ModelFile(predictor.kind) is not ModelFile.KERAS:
        return {"ran": False, "reason": f"the {ModelFile(predictor.kind).title} has no penultimate layer to read; "
                                        "pass the run or export folder (model.keras) with --engine keras to run the "
                                        "site probe",
                "sites": sites}
    feats, read = penultimate(predictor, rows.reset_index(drop=True), quiet)
    return assess(feats, rows["site"].to_numpy()[read], np.asarray(labels)[read], seed, bootstrap)


def announce(sp: dict | None, warnings: list[str], log) -> None:
    """The console line, and the warning into the evaluation's warnings."""
    if not sp:
        return
    if not sp.get("ran"):
        log(f"site probe skipped: {sp['reason']}")
    elif sp.get("warning"):
        warnings.append("site shortcut probe: " + sp["warning"])
        log("WARNING: site shortcut probe: " + sp["warning"])
    else:
        log("site probe: " + sp["verdict"])

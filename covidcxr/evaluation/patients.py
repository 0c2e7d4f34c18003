"""Patients in an evaluation: scoring per patient (``--aggregate patient``) and the patient part of the
training-overlap guard.

**Per patient**: a patient's score is the mean of the predicted probabilities over its scored films,
and its true label the films' label. A patient whose films carry different true labels (a follow-up
film read Normal after a COVID-19 one, say) has no single truth to score that mean against: scoring
it by the majority label would count films of the other label as evidence for it, and the most
severe label is a clinical judgement the toolkit cannot make. Such patients are therefore left out
of the patient-level figures, counted, listed (``mixed_labels`` in patient_predictions.csv) and named
in a warning. Films without a patient ID are left out of them too, and counted. The figures are
``figures.classification``'s (stratified bootstrap over patients), in metrics.json ``patient_level``::

    {"n_patients": 80, "n_images": 300, "images_without_patient_id": 0, "mixed_label_patients": 2,
     "mixed_label_images": 7, "aggregation": "mean probability over a patient's films",
     "figures": {... as the image-level figures, or {"single_class": ...} with one class only}}

**Patient overlap**: an evaluated image whose patient ID is also the patient ID of a training image of
the model (the train split of the run's manifest) is patient overlap: the model has seen that
patient, if not that film. It is checked when both sides have patient IDs; IDs are compared as text,
so on data from another source a match may be a coincidence of numbering (patient_overlap.csv lists
each). Like an image that matches a training image, it is counted, listed and left out of the figures
unless ``--include-train-overlap``; it is checked on the images the image guard kept. metrics.json
``patient_overlap``: ``{"checked", "reason" (when not checked), "matched", "patients", "excluded",
"included", "summary"}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.manifest import read_manifest
from covidcxr.evaluation import figures as F

AGGREGATION = "mean probability over a patient's films"


def ids_of(rows: pd.DataFrame) -> np.ndarray:
    """Each row's patient ID as text ('' where unknown or the column is absent)."""
    if "patient_id" not in rows:
        return np.full(len(rows), "", dtype=object)
    return rows["patient_id"].astype(str).str.strip().to_numpy(dtype=object)


# ---------------------------------------------------------------- per patient


@dataclass
class Patients:
    ids: np.ndarray          # one per patient, in first-film order
    y: np.ndarray            # the films' (majority, for mixed patients) true class
    probs: np.ndarray        # mean probability over the films
    films: np.ndarray        # number of films
    mixed: np.ndarray        # the films' true labels differ
    no_id: int               # films without a patient ID


def aggregate(ids: np.ndarray, y: np.ndarray, probs: np.ndarray) -> Patients:
    has = ids != ""
    codes, uniq = pd.factorize(pd.Series(ids[has]))
    y_has, p_has = np.asarray(y, int)[has], np.asarray(probs, float)[has]
    k, n = probs.shape[1], len(uniq)
    films = np.bincount(codes, minlength=n)
    sums = np.zeros((n, k))
    np.add.at(sums, codes, p_has)
    counts = np.zeros((n, k), int)
    np.add.at(counts, (codes, y_has), 1)
    mixed = (counts > 0).sum(axis=1) > 1
    return Patients(np.asarray(uniq, object), counts.argmax(axis=1), sums / films[:, None], films, mixed,
                    int((~has).sum()))


def table(pt: Patients, classes: list[str]) -> pd.DataFrame:
    """patient_predictions.csv: one row per patient with a patient ID."""
    out = pd.DataFrame({"patient_id": pt.ids, "n_images": pt.films,
                        "true_label": [classes[i] for i in pt.y], "mixed_labels": pt.mixed,
                        "pred_label": [classes[i] for i in pt.probs.argmax(axis=1)] if len(pt.ids) else []})
    for i, c in enumerate(classes):
        out[f"prob_{c}"] = pt.probs[:, i]
    return out


def patient_level(ids: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str], bootstrap: int,
                  seed: int, out: Path) -> tuple[dict, list[str]]:
    """(metrics.json ``patient_level``, warnings); writes patient_predictions.csv."""
    pt = aggregate(ids, y, probs)
    table(pt, classes).to_csv(out / "patient_predictions.csv", index=False, float_format="%.17g")
    keep = ~pt.mixed
    info = {"n_patients": int(keep.sum()), "n_images": int(pt.films[keep].sum()),
            "images_without_patient_id": pt.no_id, "mixed_label_patients": int(pt.mixed.sum()),
            "mixed_label_images": int(pt.films[pt.mixed].sum()), "aggregation": AGGREGATION}
    warnings = []
    if pt.mixed.any():
        warnings.append(f"patient level: {int(pt.mixed.sum())} patient(s) ({info['mixed_label_images']} images) have "
                        f"films of different true labels and are left out of the patient-level figures "
                        f"(mixed_labels in patient_predictions.csv), e.g. {', '.join(pt.ids[pt.mixed][:5])}")
    if pt.no_id:
        warnings.append(f"patient level: {pt.no_id} scored image(s) have no patient ID and are left out of the "
                        f"patient-level figures")
    yk, pk = pt.y[keep], pt.probs[keep]
    if not len(yk):
        info["figures"], info["note"] = None, "no patient left to score"
    elif len(np.unique(yk)) == 1:
        info["figures"] = {"single_class": F.single_class(yk, pk, classes)}
    else:
        info["figures"] = F.classification(yk, pk, classes, bootstrap, seed)
    return info, warnings


# ---------------------------------------------------------------- patient overlap with training


def train_patients(manifest_path: Path | None) -> pd.Series | None:
    """Training films per patient ID in the run's manifest (train split), or None without IDs there."""
    if manifest_path is None or not Path(manifest_path).is_file():
        return None
    man = read_manifest(manifest_path)
    ids = ids_of(man[man["split"] == "train"])
    ids = ids[ids != ""]
    return pd.Series(ids).value_counts() if len(ids) else None


@dataclass
class PatientGuard:
    hit: np.ndarray          # per scored row: its patient trained the model
    dropped: np.ndarray      # per scored row: left out
    info: dict


def guard(manifest_path: Path | None, rows: pd.DataFrame, include: bool, out: Path) -> PatientGuard:
    """Check the scored ``rows`` against the training patients; write patient_overlap.csv when any match."""
    none = np.zeros(len(rows), bool)
    ids = ids_of(rows)
    train = train_patients(manifest_path)
    why = ("no run manifest beside the model" if manifest_path is None else
           "the run's manifest has no patient IDs in its train split" if train is None else
           "the evaluated images have no patient IDs" if not (ids != "").any() else None)
    if why:
        return PatientGuard(none, none, {"checked": False, "reason": why, "matched": 0, "patients": 0,
                                         "excluded": 0, "included": False, "summary": ""})
    hit = (ids != "") & np.isin(ids, train.index.to_numpy(object))
    dropped = hit & (not include)
    n, pats = int(hit.sum()), int(len(set(ids[hit])))
    summary = (f"{n} of {len(ids)} images are of {pats} patient(s) whose films trained this model (patient IDs "
               f"of the run's train split; listed in patient_overlap.csv)"
               + (": INCLUDED in the figures (--include-train-overlap), which are therefore optimistic" if include
                  else ": left out of the figures")) if n else ""
    if n:
        pd.DataFrame({"path": rows["path"].to_numpy()[hit], "patient_id": ids[hit],
                      "training_images_of_patient": train.reindex(ids[hit]).to_numpy()}).to_csv(
            out / "patient_overlap.csv", index=False)
    return PatientGuard(hit, dropped, {"checked": True, "matched": n, "patients": pats,
                                       "excluded": int(dropped.sum()), "included": bool(include and n),
                                       "summary": summary})


def flags(flags: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """predictions.csv's train_overlap column with 'train:patient' added where the patient trained the model."""
    return np.array(["+".join(t for t in (f, "train:patient" if h else "") if t) for f, h in zip(flags, hit)],
                    dtype=object)

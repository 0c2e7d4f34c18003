"""The facts a model card is written from, each read from a file of a run, export or evaluation folder
(config.json, model_card.json, manifest.csv, history.csv, metrics.json, skipped.csv): never typed.

``gather(folder)`` -> a JSON-able dict; an export carries its run's facts (``model_card_facts.json``),
so an evaluation of the export writes the same training-data section as one of the run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from covidcxr import __version__
from covidcxr import artifacts as A
from covidcxr.data.metadata import COLUMNS, UNKNOWN

SCHEMA = "covidcxr.modelcard/1"
FACTS = "model_card_facts.json"
SMALL = 30                    # a class, split or subgroup under this many images is flagged
# metrics.json keys too bulky for a card (or repeated elsewhere in it)
DROP = ("reliability", "classification_report", "model_config", "data_summary", "skipped", "gradcam")
META_COUNTED = ("view", "sex", "site", "manufacturer")


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else None


def gather(folder: str | Path) -> dict:
    """Every fact of a run or export folder (missing files: those facts are None)."""
    folder = Path(folder)
    carried = _json(folder / FACTS)
    if carried is not None and not (folder / A.CONFIG).exists():   # an export: its run's facts travel with it
        return carried
    cfg, card = _json(folder / A.CONFIG), _json(folder / A.CARD)
    man = _csv(folder / A.MANIFEST)
    return {"schema": SCHEMA, "covidcxr": __version__, "source": str(folder), "model": card, "config": cfg,
            "data": None if man is None else data_facts(man, cfg or {}, _csv(folder / A.SKIPPED)),
            "training": training_facts(cfg, _csv(folder / A.HISTORY), _json(folder / A.METRICS)),
            "internal": internal_facts(_json(folder / A.METRICS)), "evaluations": [], "export": None}


def counts(man: pd.DataFrame) -> dict:
    """{class: {split: n}} of the manifest (every split it names, 'unused' included)."""
    t = pd.crosstab(man["label"], man["split"]) if len(man) else pd.DataFrame()
    return {str(c): {str(s): int(t.loc[c, s]) for s in t.columns} for c in t.index}


def _crossing(man: pd.DataFrame, col: str) -> int:
    ids = man[man[col].astype(str).str.strip() != ""]
    return int((ids.groupby(col)["split"].nunique() > 1).sum()) if len(ids) else 0


def split_facts(man: pd.DataFrame, cfg: dict) -> dict:
    """How the split was made: fractions, seed, and the groups (duplicates, patients) it kept together."""
    out = {"fractions": cfg.get("split"), "seed": cfg.get("seed"), "label_fraction": cfg.get("label_fraction")}
    col = "dup_group" if "dup_group" in man else "group"   # group: duplicates and patients joined (split groups)
    if col in man:
        sizes = man.groupby(col).size()
        dup = sizes[sizes > 1]
        out.update(duplicate_groups=int(len(dup)), images_in_duplicate_groups=int(dup.sum()),
                   duplicate_groups_crossing_splits=_crossing(man[man[col].isin(dup.index)], col))
    has_pid = "patient_id" in man and (man["patient_id"].astype(str).str.strip() != "").any()
    out["patients"] = int(man.loc[man["patient_id"].astype(str).str.strip() != "", "patient_id"].nunique()) \
        if has_pid else None
    out["patients_crossing_splits"] = _crossing(man, "patient_id") if has_pid else None
    out["images_with_patient_id"] = int((man["patient_id"].astype(str).str.strip() != "").sum()) if has_pid else 0
    return out


def metadata_facts(man: pd.DataFrame) -> dict:
    """Counts per value of the metadata columns the manifest has (``covidcxr.data.metadata``), and ages."""
    out = {}
    for col in (c for c in META_COUNTED if c in man):
        out[col] = {str(k): int(v) for k, v in man[col].astype(str).replace("", UNKNOWN).value_counts().items()}
    if "age" in man:
        age = pd.to_numeric(man["age"], errors="coerce").dropna()
        out["age"] = {"known": int(len(age)), "unknown": int(len(man) - len(age)),
                      **({"median": float(age.median()), "min": float(age.min()), "max": float(age.max())}
                         if len(age) else {})}
    out["columns"] = [c for c in COLUMNS if c in man]
    return out


def data_facts(man: pd.DataFrame, cfg: dict, skipped: pd.DataFrame | None) -> dict:
    left = None
    if skipped is not None:
        reasons = skipped["reason"].str.split(";").str[0].str.replace(r"^.*?: ", "", regex=True).str[:80]
        left = {"n": int(len(skipped)), "reasons": {str(k): int(v) for k, v in reasons.value_counts().head(8).items()},
                "examples": skipped.head(5).to_dict("records")}
    return {"source": cfg.get("data") or ("built-in synthetic demo images" if cfg.get("demo") else None),
            "images": int(len(man)), "classes": sorted(man["label"].unique().tolist()), "counts": counts(man),
            "split": split_facts(man, cfg), "left_out": left,
            "unused": int((man["split"] == "unused").sum()), "metadata": metadata_facts(man)}


def training_facts(cfg: dict | None, hist: pd.DataFrame | None, metrics: dict | None) -> dict | None:
    if cfg is None:
        return None
    keys = ("weights", "epochs", "fine_tune_epochs", "unfreeze", "lr", "weight_decay", "label_smoothing", "dropout",
            "batch_size", "class_weights", "augment", "monitor", "patience", "freeze_encoder", "seg_loss",
            "loss_weights", "command")
    return {"settings": {k: cfg.get(k) for k in keys if k in cfg}, "epochs_run": None if hist is None else len(hist),
            "best_epoch": (metrics or {}).get("best_epoch"), "summary": (metrics or {}).get("summary")}


def internal_facts(metrics: dict | None) -> dict | None:
    """The run's own validation and test figures (written at the end of training; no intervals)."""
    if not metrics:
        return None
    keep = ("n", "accuracy", "macro_f1", "macro_auc", "per_class", "segmentation")
    return {s: {k: metrics[s][k] for k in keep if k in metrics[s]} for s in ("val", "test") if metrics.get(s)}


def evaluation_facts(metrics: dict, out: str | Path) -> dict:
    """One evaluation's metrics.json, less its bulky parts, plus the figure files in its folder."""
    ev = {k: v for k, v in metrics.items() if k not in DROP}
    ev["skipped_n"] = len(metrics.get("skipped") or [])
    ev["folder"] = str(out)
    ev["figure_files"] = sorted(p.name for p in Path(out).glob("*.png"))
    return ev


def _plain(o):
    """numpy scalars and arrays (an evaluation's live metrics) as JSON numbers and lists."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def save(folder: str | Path, facts: dict) -> Path:
    path = Path(folder) / FACTS
    A.atomic_write_text(path, json.dumps(facts, indent=2, default=_plain))
    return path

"""Which images an evaluation scores, and what they mean to the model.

- **Run-aware**: given a run (or an export of one) and no ``--data``, or the run's own data
  folder or manifest, the run's manifest decides the splits, and ``--split auto`` is the
  run's held-out split (test, else val): never the images it trained on.
- **External validation**: ``--label-map`` maps a model trained on one dataset's classes onto
  another dataset's (``COVID-19=COVID,Normal=Normal,Non-COVID=Lung_Opacity+Viral Pneumonia``:
  model classes on the left, data classes on the right, ``+`` merging several); metrics are
  on the mapped classes and the report says "external".
- **Training-overlap guard**: images that match a training image of the model (same bytes,
  or a near-duplicate, mirrored included, by the same perceptual-hash-and-thumbnail test as
  ``data index``) are counted, listed and left out unless ``--include-train-overlap``, even
  when they also match a validation image (themselves, in run-aware mode: the training and
  validation images are matched separately). Matches with validation images are listed too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from covidcxr import artifacts as A
from covidcxr.data.dedup import match_reference
from covidcxr.data.manifest import build_manifest, read_manifest
from covidcxr.errors import ConfigError, DataError


@dataclass
class EvalData:
    df: pd.DataFrame              # the rows to score (split chosen)
    df_all: pd.DataFrame          # every row of the data (for calibration and the data summary)
    split: str
    description: str
    run_data: bool = False        # the model's own training data (its manifest)
    has_split: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)   # files indexing left out

    @property
    def classes(self) -> list[str]:
        """The data's classes (every split), sorted."""
        return sorted(self.df_all["label"].unique())


def _same_path(a, b) -> bool:
    try:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _read_run_manifest(path: Path) -> pd.DataFrame:
    df = read_manifest(path)
    return df[df["split"] != "unused"].reset_index(drop=True)


def load(loc: A.Located, data: str | None, split: str, seed: int = 42, progress: bool = True) -> EvalData:
    """The evaluation rows for model ``loc`` on ``data`` (None: the run's own data)."""
    cfg, man = loc.config or {}, loc.manifest_path
    own = data is None or _same_path(data, cfg.get("data")) or (man is not None and _same_path(data, man))
    if own:
        if man is None:
            raise DataError(f"--model {loc.root}: no {A.MANIFEST} beside it (a bare export); pass --data.")
        df_all, desc, has_split, problems = _read_run_manifest(man), f"the run's own data ({man})", True, []
    else:
        df_all, desc, has_split, problems = load_external(data, seed, progress)
    df, split = choose_split(df_all, split, has_split, own)
    return EvalData(df, df_all, split, desc, own, has_split, problems)


def load_data(data: str | Path, split: str, seed: int = 42, progress: bool = True) -> EvalData:
    """The rows of ``split`` of a dataset folder or manifest that is not a model's own data (zero-shot)."""
    df_all, desc, has_split, problems = load_external(data, seed, progress)
    df, split = choose_split(df_all, split, has_split, False)
    return EvalData(df, df_all, split, desc, False, has_split, problems)


def load_external(data: str | Path, seed: int = 42, progress: bool = True):
    """(rows, description, has its own split, [(path, reason)] indexing left out) of a dataset folder
    (indexed now, in memory) or a manifest CSV."""
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder.")
    if path.is_file():
        return read_manifest(path), f"manifest {path}", True, []
    # One class is enough to be scored (an external set of positives only): see single_class.
    df_all, rep = build_manifest(path, (0.7, 0.15, 0.15), seed=seed, progress=progress, min_classes=1)
    has_split = rep.split_source.startswith("dataset's own split")
    desc = f"{rep.layout} folder {rep.root} ({rep.split_source if has_split else 'no split of its own'})"
    return df_all, desc, has_split, [(p.path, p.reason) for p in rep.problems]


def choose_split(df: pd.DataFrame, split: str, has_split: bool, run_data: bool) -> tuple[pd.DataFrame, str]:
    counts = df["split"].value_counts().to_dict() if has_split else {}
    if split == "auto":
        held_out = next((s for s in ("test", "val") if counts.get(s)), None)
        if run_data and held_out is None:
            raise DataError("the run's manifest has no val or test images to evaluate on; pass --data.")
        split = held_out or "all"
    if split == "all":
        return df.reset_index(drop=True), "all"
    if not has_split:
        raise DataError(f"--split {split}: this data has no split of its own (a plain folder): use --split all, or "
                        f"evaluate on the model's own data (omit --data) to use the run's split.")
    sub = df[df["split"] == split].reset_index(drop=True)
    if sub.empty:
        raise DataError(f"--split {split} is empty in this data (splits present: "
                        f"{', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'}).")
    return sub, split


# ---------------------------------------------------------------- label maps


@dataclass
class LabelMap:
    """Evaluation classes as groups of model classes and of data classes."""

    names: list[str]
    model_groups: list[list[int]]     # model class indices per evaluation class
    data_groups: list[list[str]]      # data class names per evaluation class
    text: str = ""
    absent: list[str] = field(default_factory=list)   # data classes of the map this data has no images of

    def data_label(self, label: str) -> str:
        for name, group in zip(self.names, self.data_groups):
            if label in group:
                return name
        raise KeyError(label)

    def probs(self, model_probs: np.ndarray) -> np.ndarray:
        return np.stack([model_probs[:, g].sum(axis=1) for g in self.model_groups], axis=1)

    def warnings(self) -> list[str]:
        return [f"the label map names data class(es) {self.absent} that this data has no images of (an external "
                f"set often holds only some classes); they are scored as absent"] if self.absent else []


def _parse_pairs(text: str) -> list[tuple[str, str]]:
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json") and path.exists():
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            raise ConfigError(f"--label-map {text}: expected a mapping MODEL_CLASS: [DATA_CLASS, ...].")
        return [(str(k), "+".join(v) if isinstance(v, list) else str(v)) for k, v in doc.items()]
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ConfigError(f"--label-map {text!r}: write MODEL_CLASS=DATA_CLASS[+DATA_CLASS...], comma-separated "
                          f"(or give a YAML file).")
    return [(a.strip(), b.strip()) for a, b in pairs]


def _check_coverage(seen_m: list[str], seen_d: list[str], model_classes: list[str], data_classes: list[str]):
    """Every model class and every data class of the data exactly once; data classes the data lacks are
    allowed (returned) only when every class it has is mapped (else they are most likely typos)."""
    unknown = sorted({c for c in seen_d if c not in data_classes})
    for kind, seen, every in (("model", seen_m, model_classes), ("data", seen_d, data_classes)):
        twice = sorted({c for c in seen if seen.count(c) > 1})
        missing = [c for c in every if c not in seen]
        if twice:
            raise ConfigError(f"--label-map: {kind} class(es) {twice} appear more than once.")
        if missing and kind == "data" and unknown:
            raise ConfigError(f"--label-map: {unknown} are not classes of the data ({data_classes}), and data "
                              f"class(es) {missing} are not mapped.")
        if missing:
            raise ConfigError(f"--label-map: {kind} class(es) {missing} are not mapped; map every class (merge with "
                              f"'+').")
    return unknown


def parse_label_map(text: str, model_classes: list[str], data_classes: list[str]) -> LabelMap:
    """Every model class and every data class must appear exactly once (data classes this data
    lacks may appear too: see ``_check_coverage``)."""
    names, mg, dg, seen_m, seen_d = [], [], [], [], []
    for left, right in _parse_pairs(text):
        m, d = [c.strip() for c in left.split("+")], [c.strip() for c in right.split("+")]
        bad_m = [c for c in m if c not in model_classes]
        if bad_m:
            raise ConfigError(f"--label-map: {bad_m} are not classes of the model ({model_classes}).")
        names.append(left)
        mg.append([model_classes.index(c) for c in m])
        dg.append(d)
        seen_m += m
        seen_d += d
    return LabelMap(names, mg, dg, text, _check_coverage(seen_m, seen_d, model_classes, data_classes))


def check_classes(df: pd.DataFrame, classes: list[str]) -> list[str]:
    """Refuse data the model cannot be scored on; warnings for classes the data lacks."""
    data_classes = sorted(df["label"].unique())
    if not set(data_classes) & set(classes):
        raise DataError(f"the data's classes {data_classes} are none of the model's classes {classes}; is this the "
                        f"right model for this data? For another dataset's classes pass --label-map.")
    unknown = [c for c in data_classes if c not in classes]
    if unknown:
        raise DataError(f"the data has classes the model does not know: {unknown} (model: {classes}). Evaluate on a "
                        f"manifest without them, or map them with --label-map (external validation).")
    missing = [c for c in classes if c not in data_classes]
    return [f"the data has no images of {missing}; their AUC is undefined and they count as 0 in macro recall"] \
        if missing else []


# ---------------------------------------------------------------- training-overlap guard


@dataclass
class Overlap:
    """Per evaluated row, its match with the model's training images and, separately, with its
    validation images ('' | exact | near | mirrored each): an image may match both (the Val copy
    of a Train film matches itself among the validation images and the film among the training
    images), and a match with any training image makes it training overlap."""

    kind: np.ndarray       # the match with a training image
    val_kind: np.ndarray   # the match with a validation image
    match: list[str]       # the matching image (index in the fingerprints; the training one first) as text

    @property
    def train(self) -> np.ndarray:
        return self.kind != ""

    @property
    def val(self) -> np.ndarray:
        return self.val_kind != ""

    @property
    def role(self) -> np.ndarray:
        """'train' (matches a training image, whatever else it matches), 'val' (a validation image only) or ''."""
        return np.where(self.train, "train", np.where(self.val, "val", ""))

    def flags(self) -> np.ndarray:
        """predictions.csv's train_overlap column: 'train:near', 'val:exact', 'train:near+val:exact', ''."""
        return np.array(["+".join(f"{r}:{k}" for r, k in (("train", t), ("val", v)) if k)
                         for t, v in zip(self.kind, self.val_kind)], dtype=object)

    def table(self, paths: np.ndarray) -> pd.DataFrame:
        """train_overlap.csv: every row that matches a training or a validation image."""
        hit = self.train | self.val
        role = self.role[hit]
        return pd.DataFrame({"path": paths[hit], "role": role,
                             "match": np.where(role == "train", self.kind[hit], self.val_kind[hit]),
                             "train_match": self.kind[hit], "validation_match": self.val_kind[hit]})

    def summary(self, included: bool) -> str:
        train, val = self.train, self.val
        both = int((train & val).sum())
        return (f"{int(train.sum())} of {len(train)} images match an image that trained this model (exact or near "
                f"duplicate, mirrored included; listed in train_overlap.csv)"
                + (": INCLUDED in the figures (--include-train-overlap), which are therefore optimistic" if included
                   else ": left out of the figures")
                + (f"; {int(val.sum())} match its validation images (they chose the checkpoint)" if val.any() else "")
                + (f", {both} of them a training image too (counted as training overlap)" if both else ""))


def _fingerprint_arrays(eval_fps: list[tuple | None]):
    """(known, sha, phash, phash_mirror, 16 x 16 thumbnails) of the evaluated images."""
    n = len(eval_fps)
    known = np.array([f is not None for f in eval_fps], bool)
    sha = np.zeros((n, 32), np.uint8)
    ph, pm = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    thumbs = np.zeros((n, 16, 16), np.uint8)
    for i, f in enumerate(eval_fps):
        if f is not None:
            sha[i] = np.frombuffer(f[0], np.uint8)
            ph[i], pm[i] = np.uint64(f[1]), np.uint64(f[2])
            thumbs[i] = f[3].reshape(16, 2, 16, 2).mean(axis=(1, 3)).round().astype(np.uint8)
    return known, sha, ph, pm, thumbs


def training_overlap(fp_path: Path | None, eval_fps: list[tuple | None]) -> Overlap | None:
    """Match each evaluated image (its fingerprint, or None) against the model's training images and,
    separately, its validation images, so that an exact match with one never hides a near-duplicate
    of the other."""
    if fp_path is None:
        return None
    ref = np.load(fp_path)
    known, sha, ph, pm, thumbs = _fingerprint_arrays(eval_fps)
    ref_known = ref["known"].astype(bool) if "known" in ref.files else np.ones(len(ref["role"]), bool)
    kinds, idxs = [], []
    for role in (0, 1):   # 0: training images, 1: validation images
        pick = np.flatnonzero((ref["role"] == role) & ref_known)
        idx, kind = match_reference(sha, ph, pm, thumbs, ref["sha"][pick], ref["phash"][pick],
                                    ref["phash_mirror"][pick], ref["thumbs16"][pick])
        kinds.append(np.where(known, kind, "").astype(object))
        idxs.append(np.where(idx >= 0, pick[np.maximum(idx, 0)] if len(pick) else -1, -1))
    first = np.where(kinds[0] != "", idxs[0], np.where(kinds[1] != "", idxs[1], -1))
    return Overlap(kinds[0], kinds[1], [str(i) if i >= 0 else "" for i in first])


def data_summary(df_all: pd.DataFrame, df: pd.DataFrame, has_split: bool, skipped: list) -> dict:
    out = {"images_considered": int(len(df)), "images_skipped": len(skipped),
           "classes_evaluated": {k: int(v) for k, v in df["label"].value_counts().sort_index().items()}}
    if has_split:
        out["class_by_split"] = {c: {k: int(v) for k, v in g["split"].value_counts().items()}
                                 for c, g in df_all.groupby("label")}
    col = "dup_group" if "dup_group" in df_all else "group"  # group: duplicates and patients together
    if col in df_all:
        sizes = df_all.groupby(col).size()
        dup = sizes[sizes > 1]
        out["duplicate_groups"] = int(len(dup))
        out["duplicate_groups_crossing_splits"] = int(sum(1 for _, s in df_all[df_all[col].isin(dup.index)]
                                                          .groupby(col) if s["split"].nunique() > 1))
    return out


def checkpoint_images(ed: EvalData, scored: pd.DataFrame, val_matched: int, requested: str) -> dict | None:
    """The scored images that chose the model's checkpoint (its validation images, by the run's
    manifest or by fingerprint: ``val_matched`` scored images match one), with the warning that says
    so; None when there are none."""
    by_run = int((scored["split"] == "val").sum()) if ed.run_data and "split" in scored else 0
    n = max(by_run, int(val_matched))
    if not n:
        return None
    how = ("the run's own val split, by its manifest" if by_run >= val_matched else
           "found by its training fingerprints: the same file or a near-duplicate")
    counts = ed.df_all["split"].value_counts() if ed.has_split else {}
    present = ", ".join(f"{k} {counts[k]}" for k in ("train", "val", "test") if k in counts)
    why = (f" --split auto scored 'val' because this data has no test split (splits present: {present})."
           if requested == "auto" and ed.split == "val" else "")
    text = (f"SCORING THE CHECKPOINT'S OWN IMAGES: {n} of the {len(scored)} scored images are validation images of "
            f"this model ({how}). They chose its checkpoint (the best epoch), so every figure here is optimistic, not "
            f"a held-out estimate.{why} Evaluate on images the model never saw: a test split or external data.")
    return {"n": n, "of": int(len(scored)), "by_run_manifest": by_run, "by_fingerprint": int(val_matched),
            "warning": text}

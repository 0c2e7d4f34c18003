"""Per-image metadata of a manifest: patient, study, view, sex, age, site, scanner maker.

The manifest's metadata columns (``COLUMNS``) always exist once read. ``patient_id`` and
``study_id`` are empty where unknown (an empty ID groups nothing); the others hold ``UNKNOWN``
where unknown, never dropped. ``age`` is in years (a decimal number as text); ``sex`` is one of
``SEXES`` and ``view`` one of ``VIEWS``.

Where the values come from: a per-image table (``data index --metadata META.csv``, joined in
``metatable.py``) or, without one, the DICOM files' own tags (``dicomtags.py``). This module holds
the normalisation both use (``normalise_columns``: unrecognised values become unknown and are
counted, never dropped), what ``index``/``audit`` report (``MetadataReport``, ``coverage``,
``crossing_patients``) and ``patient_overlap`` for evaluation's training-overlap guard.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

COLUMNS = ("patient_id", "study_id", "view", "sex", "age", "site", "manufacturer")
UNKNOWN = "unknown"
SEXES = ("F", "M", "other", UNKNOWN)
VIEWS = ("PA", "AP", "LATERAL", "other", UNKNOWN)
ID_COLUMNS = ("patient_id", "study_id")     # empty where unknown
MAX_AGE = 130.0

# Spellings of "no value" in tables and tags (compared case-folded, stripped).
_MISSING = {"", "unknown", "unk", "u", "nan", "na", "n/a", "none", "null", "?", "-", "--", "not reported",
            "not available", "missing"}
_SEX = {"f": "F", "female": "F", "woman": "F", "w": "F", "girl": "F", "fem": "F",
        "m": "M", "male": "M", "man": "M", "boy": "M", "mal": "M",
        "o": "other", "other": "other", "x": "other", "diverse": "other", "nonbinary": "other",
        "non-binary": "other", "intersex": "other"}
_LATERAL = {"lateral", "lat", "ll", "rl", "latl", "latr", "lateralleft", "lateralright"}
_OTHER_VIEW = {"lao", "rao", "lpo", "rpo", "oblique", "obl", "swimmers", "swimmer", "lordotic", "decubitus",
               "lld", "rld", "axial"}
_AGE = re.compile(r"^(\d+(?:[.,]\d+)?)\s*([a-z]*)\.?$")
_AGE_UNITS = {**dict.fromkeys(("", "y", "yr", "yrs", "year", "years", "a", "j"), 1.0),
              **dict.fromkeys(("m", "mo", "mos", "mon", "month", "months"), 12.0),
              **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 365.25 / 7),
              **dict.fromkeys(("d", "day", "days"), 365.25)}


def _blank(text: str) -> bool:
    return text.strip().casefold() in _MISSING


def normalise_id(text: str) -> tuple[str, bool]:
    """A patient or study ID: stripped; empty where missing."""
    return ("" if _blank(text) else " ".join(text.split())), True


def normalise_text(text: str) -> tuple[str, bool]:
    """A site or scanner maker: whitespace collapsed; ``UNKNOWN`` where missing."""
    return (UNKNOWN if _blank(text) else " ".join(text.split())), True


def normalise_sex(text: str) -> tuple[str, bool]:
    """-> (one of ``SEXES``, understood). 'female', 'F', 'woman' -> F; DICOM 'O' -> other."""
    key = text.strip().casefold()
    if key in _MISSING:
        return UNKNOWN, True
    value = _SEX.get(key)
    return (value, True) if value else (UNKNOWN, False)


def normalise_view(text: str) -> tuple[str, bool]:
    """-> (one of ``VIEWS``, understood). 'PA', 'postero-anterior' -> PA; 'AP Supine', 'AP portable'
    -> AP; 'LL', 'RL', 'LAT', 'left lateral' -> LATERAL; decubitus, oblique, lordotic -> other."""
    key = text.strip().casefold()
    if key in _MISSING:
        return UNKNOWN, True
    tokens = [t for t in re.split(r"[^a-z0-9]+", key) if t]
    if not tokens:
        return UNKNOWN, False
    if any(t in _OTHER_VIEW for t in tokens):
        return "other", True
    if any(t in _LATERAL for t in tokens):
        return "LATERAL", True
    first = "".join(tokens[:2]) if tokens[:2] in (["postero", "anterior"], ["antero", "posterior"]) else tokens[0]
    if first in ("pa", "posteroanterior", "frontalpa"):
        return "PA", True
    if first in ("ap", "anteroposterior", "frontalap"):
        return "AP", True
    return UNKNOWN, False


def normalise_age(text: str) -> tuple[str, bool]:
    """-> (years as text, understood). '45', '45Y', '045Y', '45 years', '6 months', '006M', '002W',
    '010D' are converted to years ('45', '0.5', '0.038', '0.027'); '-3', 'abc' or over 130 years
    -> (``UNKNOWN``, False)."""
    key = text.strip().casefold()
    if key in _MISSING:
        return UNKNOWN, True
    m = _AGE.match(key)
    if not m or m.group(2) not in _AGE_UNITS:
        return UNKNOWN, False
    years = float(m.group(1).replace(",", ".")) / _AGE_UNITS[m.group(2)]
    if years > MAX_AGE:
        return UNKNOWN, False
    return f"{round(years, 3):g}", True


NORMALISERS = {"patient_id": normalise_id, "study_id": normalise_id, "view": normalise_view,
               "sex": normalise_sex, "age": normalise_age, "site": normalise_text,
               "manufacturer": normalise_text}


def missing_value(column: str) -> str:
    """What a metadata column holds where the value is unknown."""
    return "" if column in ID_COLUMNS else UNKNOWN


def normalise_columns(raw: dict[str, list[str]], n: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Raw text per column (columns absent from ``raw`` are all unknown) -> (every column of
    ``COLUMNS``, normalised; {column: the raw values not understood, one per image, now unknown}).
    Each distinct value is normalised once, so a 20,000-row table costs milliseconds."""
    out, invalid = {}, {}
    for col in COLUMNS:
        values = raw.get(col)
        if values is None:
            out[col] = [missing_value(col)] * n
            continue
        fn = NORMALISERS[col]
        table = {v: fn(v) for v in set(values)}
        out[col] = [table[v][0] for v in values]
        bad = [v for v in values if not table[v][1]]
        if bad:
            invalid[col] = bad
    return out, invalid


def ensure_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add every missing metadata column (unknown) and fill empty non-ID cells with ``UNKNOWN``, in place:
    consumers of any manifest, old or new, can rely on ``COLUMNS``."""
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = missing_value(col)
        elif col not in ID_COLUMNS:
            df[col] = df[col].where(df[col].str.strip() != "", UNKNOWN)
    return df


@dataclass
class MetadataReport:
    """Where an index's metadata came from and what did not match (counted and listed, never silent)."""
    source: str = "none"                                       # "table PATH", "DICOM tags", "none"
    columns: dict[str, str] = field(default_factory=dict)      # manifest column -> table column or tag
    file_column: str = ""
    rows: int = 0                                              # table rows
    matched: int = 0                                           # images with a table row
    unmatched_rows: list[tuple[int, str]] = field(default_factory=list)  # (row number, file value)
    unmatched_files: list[str] = field(default_factory=list)
    invalid: dict[str, list[str]] = field(default_factory=dict)  # column -> raw values stored as unknown
    unreadable: list[str] = field(default_factory=list)          # DICOM headers that could not be read

    def lines(self, max_list: int = 10) -> list[str]:
        if self.source == "none":
            return []
        found = ", ".join(f"{c} <- {v!r}" for c, v in self.columns.items()) or "none"
        absent = [c for c in COLUMNS if c not in self.columns]
        out = [f"metadata: {self.source}; columns: {found}" + (f"; not found: {', '.join(absent)}" if absent else "")]
        if self.file_column:
            out.append(f"  {self.rows} table rows, file column {self.file_column!r}: {self.matched} images matched; "
                       f"{len(self.unmatched_rows)} rows match no image; {len(self.unmatched_files)} images match "
                       f"no row (their metadata is unknown)")
        if self.unmatched_rows:
            out.append(f"  rows matching no image (first {min(max_list, len(self.unmatched_rows))}): "
                       + ", ".join(f"row {r} {v!r}" for r, v in self.unmatched_rows[:max_list]))
        if self.unmatched_files:
            out.append(f"  images matching no row (first {min(max_list, len(self.unmatched_files))}): "
                       + ", ".join(self.unmatched_files[:max_list]))
        for col, bad in self.invalid.items():
            examples = ", ".join(repr(v) for v in list(dict.fromkeys(bad))[:5])
            out.append(f"  {len(bad)} {col} value(s) not understood (e.g. {examples}): stored as {UNKNOWN}")
        if self.unreadable:
            out.append(f"  {len(self.unreadable)} DICOM header(s) unreadable, metadata unknown: "
                       + ", ".join(self.unreadable[:max_list]))
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "columns": dict(self.columns), "file_column": self.file_column,
                "rows": self.rows, "matched": self.matched,
                "unmatched_rows": [{"row": r, "file": v} for r, v in self.unmatched_rows],
                "unmatched_files": list(self.unmatched_files),
                "invalid": {c: len(v) for c, v in self.invalid.items()}, "unreadable": list(self.unreadable)}


def coverage(df: pd.DataFrame) -> dict:
    """How much metadata a manifest has: images with a patient/study ID, patients, films per patient,
    known ages, and counts per view, sex, site and scanner maker."""
    df = ensure_columns(df.copy())
    pid = df["patient_id"][df["patient_id"] != ""]
    films = pid.value_counts()
    ages = pd.to_numeric(df["age"], errors="coerce").dropna()
    counts = lambda col: {str(k): int(v) for k, v in df[col].value_counts().items()}  # noqa: E731
    return {"images": int(len(df)), "with_patient_id": int(len(pid)), "patients": int(len(films)),
            "max_films_per_patient": int(films.max()) if len(films) else 0,
            "with_study_id": int((df["study_id"] != "").sum()), "with_age": int(len(ages)),
            "age_years": ({"min": float(ages.min()), "median": float(ages.median()), "max": float(ages.max())}
                          if len(ages) else None),
            "view": counts("view"), "sex": counts("sex"), "site": counts("site"),
            "manufacturer": counts("manufacturer")}


def format_coverage(c: dict, max_items: int = 8) -> list[str]:
    def top(d: dict) -> str:
        items = list(d.items())
        more = f", ... {len(items) - max_items} more" if len(items) > max_items else ""
        return ", ".join(f"{k} {v}" for k, v in items[:max_items]) + more

    age = c["age_years"]
    return [f"Patients: {c['patients']} ({c['with_patient_id']} of {c['images']} images have a patient ID; "
            f"at most {c['max_films_per_patient']} films per patient); {c['with_study_id']} with a study ID",
            f"Ages known: {c['with_age']}" + (f" ({age['min']:g}-{age['max']:g} years, median {age['median']:g})"
                                              if age else ""),
            f"View: {top(c['view'])}", f"Sex: {top(c['sex'])}", f"Site: {top(c['site'])}",
            f"Manufacturer: {top(c['manufacturer'])}"]


def crossing_patients(df: pd.DataFrame) -> list[dict]:
    """Patients whose films sit in more than one split: [{"patient_id", "splits": {split: images}}]."""
    if "patient_id" not in df.columns:
        return []
    known = df[df["patient_id"] != ""]
    per = known.groupby("patient_id")["split"].nunique()
    out = []
    for pid in sorted(per.index[per > 1]):
        splits = known.loc[known["patient_id"] == pid, "split"].value_counts()
        out.append({"patient_id": str(pid), "splits": {str(k): int(v) for k, v in sorted(splits.items())}})
    return out


def format_crossing_patient(p: dict) -> str:
    return f"patient {p['patient_id']}: " + ", ".join(f"{s} {n}" for s, n in p["splits"].items())


def has_patient_ids(df: pd.DataFrame) -> bool:
    """True where the table has a ``patient_id`` column with at least one non-empty ID."""
    return "patient_id" in df.columns and bool((df["patient_id"].astype(str).str.strip() != "").any())


def patient_overlap(train_df: pd.DataFrame, eval_df: pd.DataFrame) -> list[str]:
    """The patient IDs found in both tables (sorted; empty IDs never count). For evaluation's
    training-overlap guard: ``eval_df[eval_df.patient_id.isin(patient_overlap(train, eval))]`` are the
    evaluated images whose patient is in the training set. Where either side has no patient IDs
    (``has_patient_ids`` is False) the answer is [] and says nothing; check that first.

    IDs are compared as stripped text, across sites: two datasets numbering patients "1", "2", ...
    independently overlap by accident, so a caller mixing sources should also compare ``site``."""
    if not (has_patient_ids(train_df) and has_patient_ids(eval_df)):
        return []
    a = set(train_df["patient_id"].astype(str).str.strip()) - {""}
    b = set(eval_df["patient_id"].astype(str).str.strip()) - {""}
    return sorted(a & b)

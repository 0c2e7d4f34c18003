"""A per-image metadata table (``data index --metadata META.csv``): read it, find its columns, join
it to the dataset's files.

Columns are found by their common spellings, compared case- and separator-insensitively
(``PatientID``, ``Patient ID``, ``patient_id`` are one name; see ``ALIASES``), or named with
``--metadata-columns patient=COL,view=COL,file=COL``. The file column holds, per row, a file name
(``COVID-1.png``; without extension or in another case, as in the Kaggle COVID-19 Radiography
metadata sheets, where nothing else matches), a path relative to the data folder (or ending in one),
or an absolute path. Rows that match no image and images that match no row are counted and listed;
one image matched by two rows, or one name matching two images, is refused.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pandas as pd

from covidcxr.data.imageio import IMAGE_EXTENSIONS
from covidcxr.data.metadata import COLUMNS, MetadataReport, normalise_columns
from covidcxr.errors import ConfigError, DataError

FILE = "file"
ALIASES: dict[str, tuple[str, ...]] = {     # most specific first: the first present wins
    FILE: ("path", "filepath", "imagepath", "relativepath", "file", "filename", "fname", "image", "imageindex",
           "imagename", "imagefile", "imageid", "dicomid", "dicomfile", "dicompath"),
    "patient_id": ("patientid", "patient", "subjectid", "subject", "patientnumber", "patientidentifier"),
    "study_id": ("studyid", "studyinstanceuid", "studyuid", "study", "accessionnumber"),
    "view": ("view", "viewposition", "projection", "viewpos"),
    "sex": ("sex", "patientsex", "gender", "patientgender"),
    "age": ("age", "patientage", "ageyears", "ageatstudy"),
    "site": ("site", "source", "institution", "institutionname", "hospital", "center", "centre"),
    "manufacturer": ("manufacturer", "scanner", "vendor", "scannermanufacturer"),
}
FLAG_KEYS = {"file": FILE, "path": FILE, "patient": "patient_id", "patient_id": "patient_id", "study": "study_id",
             "study_id": "study_id", **{c: c for c in COLUMNS}}
SPREADSHEETS = {".xlsx", ".xls", ".xlsm", ".ods", ".numbers", ".parquet", ".feather", ".json"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.casefold())


def read_table(path: str | Path) -> pd.DataFrame:
    """The table as text (nothing parsed as numbers or NaN); comma, semicolon or tab separated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--metadata {path}: no such file.")
    if path.suffix.lower() in SPREADSHEETS:
        raise DataError(f"--metadata {path}: a {path.suffix} file, not CSV; open it and save it as CSV "
                        f"(one row per image, with a header row), then pass the .csv.")
    head = path.read_bytes()[:65536]
    if head.startswith(b"PK\x03\x04") or b"\x00" in head:
        raise DataError(f"--metadata {path}: a binary file (a spreadsheet or archive?), not CSV; save it as CSV.")
    text = head.decode("utf-8-sig", errors="replace")
    try:
        sep = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t").delimiter
    except csv.Error:
        sep = ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                         encoding_errors="replace", skipinitialspace=True)
    except Exception as exc:
        raise DataError(f"--metadata {path}: not a readable CSV table ({' '.join(str(exc).split())})") from exc
    if df.empty:
        raise DataError(f"--metadata {path}: no rows under the header; give one row per image.")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def parse_column_spec(text: str | None) -> dict[str, str]:
    """'patient=Patient ID,view=ViewPosition,file=Image Index' -> {manifest column: table column}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, col = part.partition("=")
        field = FLAG_KEYS.get(key.strip().casefold())
        if not eq or not col.strip() or field is None:
            raise ConfigError(f"--metadata-columns {part!r}: expected KEY=COLUMN with KEY one of "
                              f"{', '.join(sorted(set(FLAG_KEYS) - {'path', 'patient_id', 'study_id'}))}")
        out[field] = col.strip()
    return out


def resolve_columns(columns: list[str], given: dict[str, str], path: str | Path) -> dict[str, str]:
    """{manifest column or ``FILE``: table column}: the ``given`` ones (each must exist), then detected."""
    for field, col in given.items():
        if col not in columns:
            close = [c for c in columns if _key(c) == _key(col)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"--metadata-columns {field}={col}: {path} has no column {col!r}{hint}; "
                            f"its columns: {', '.join(map(repr, columns))}")
    out = dict(given)
    keyed: dict[str, str] = {}
    for c in columns:
        keyed.setdefault(_key(c), c)
    used = set(out.values())
    for field, names in ALIASES.items():
        if field in out:
            continue
        for name in names:
            col = keyed.get(name)
            if col is not None and col not in used:
                out[field] = col
                used.add(col)
                break
    if FILE not in out:
        raise DataError(f"--metadata {path}: no file column found among {', '.join(map(repr, columns))} "
                        f"(expected e.g. 'path', 'file', 'filename', 'Image Index'); name it with "
                        f"--metadata-columns file=COLUMN. A table that is not comma-, semicolon- or "
                        f"tab-separated reads as one column.")
    return out


class _Index:
    """Lookups from a table's file value to the image it names."""

    def __init__(self, paths: list[str], roots: list[str]):
        # str.rpartition, not os.path: this runs once per image and per table row (20,000 of each)
        self.abs: dict[str, int] = {p: i for i, p in enumerate(paths)}  # index's paths are normalised already
        self.rel: dict[str, int] = {}
        for root in dict.fromkeys(os.path.normpath(r) for r in roots):
            prefix = root.rstrip(os.sep) + os.sep
            cut = len(prefix)
            for i, p in enumerate(paths):
                if p.startswith(prefix):
                    self.rel.setdefault(p[cut:].replace(os.sep, "/") if os.sep != "/" else p[cut:], i)
        self.names: dict[str, list[int]] = {}
        self.folded: dict[str, list[int]] = {}
        self.stems: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            name = p.rpartition(os.sep)[2]
            folded = name.casefold()
            self.names.setdefault(name, []).append(i)
            self.folded.setdefault(folded, []).append(i)
            stem = folded.rpartition(".")
            self.stems.setdefault(stem[0] if stem[1] else folded, []).append(i)

    def find(self, value: str) -> list[int]:
        v = value.strip().replace("\\", "/")
        if not v:
            return []
        if os.path.isabs(v):
            i = self.abs.get(v)
            if i is None:
                i = self.abs.get(os.path.normpath(v))
            return [] if i is None else [i]
        parts = [p for p in v.split("/") if p not in ("", ".")]
        for k in range(len(parts) - 1):          # a relative path, or one ending in a relative path
            i = self.rel.get("/".join(parts[k:]))
            if i is not None:
                return [i]
        name = parts[-1] if parts else ""
        hit = self.names.get(name) or self.folded.get(name.casefold())
        if not hit and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            hit = self.stems.get(name.casefold())
        return hit or []


def match_rows(values: list[str], paths: list[str], roots: list[str], table: str | Path) -> tuple[list[int], list[tuple[int, str]]]:
    """(table row index per image or -1, [(row number, value)] of rows matching no image).
    Row numbers are as a spreadsheet shows them: the header is row 1."""
    index = _Index(paths, roots)
    row_of = [-1] * len(paths)
    unmatched: list[tuple[int, str]] = []
    for r, v in enumerate(values):
        hit = index.find(v)
        if len(hit) > 1:
            shown = ", ".join(paths[i] for i in hit[:3])
            raise DataError(f"--metadata {table}: row {r + 2} names {v!r}, which matches {len(hit)} images "
                            f"({shown}{', ...' if len(hit) > 3 else ''}); give paths relative to the data folder "
                            f"in the file column.")
        if not hit:
            unmatched.append((r + 2, v))
            continue
        i = hit[0]
        if row_of[i] >= 0:
            raise DataError(f"--metadata {table}: rows {row_of[i] + 2} and {r + 2} both match {paths[i]}; "
                            f"keep one row per image.")
        row_of[i] = r
    return row_of, unmatched


def join_table(path: str | Path, spec: str | dict | None, paths: list[str], roots: list[str],
               table: pd.DataFrame | None = None,
               keep: list[bool] | None = None) -> tuple[dict[str, list[str]], MetadataReport]:
    """Join the table at ``path`` (or the already read ``table``) to ``paths``: (normalised ``COLUMNS``
    per kept image, report). Matching runs over every path, so a row naming a file that is then left
    out (``keep`` False: unreadable) is not "unmatched"; the values, counts and lists cover the kept
    images. Kept images without a row get unknown values, never dropped."""
    given = spec if isinstance(spec, dict) else parse_column_spec(spec)
    df = read_table(path) if table is None else table
    cols = resolve_columns(list(df.columns), given, path)
    row_of, unmatched = match_rows(df[cols[FILE]].tolist(), paths, roots, path)
    if keep is not None:
        paths = [p for p, k in zip(paths, keep) if k]
        row_of = [r for r, k in zip(row_of, keep) if k]
    raw = {}
    for field, col in cols.items():
        if field != FILE:
            values = df[col].tolist()
            raw[field] = [values[r] if r >= 0 else "" for r in row_of]
    values, invalid = normalise_columns(raw, len(paths))
    report = MetadataReport(source=f"table {path}", columns={c: cols[c] for c in COLUMNS if c in cols},
                            file_column=cols[FILE], rows=len(df), matched=sum(r >= 0 for r in row_of),
                            unmatched_rows=unmatched, unmatched_files=[p for p, r in zip(paths, row_of) if r < 0],
                            invalid=invalid)
    return values, report

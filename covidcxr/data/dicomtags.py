"""Metadata from DICOM files' own tags, for an index without a metadata table.

Only the header is read (``dcmread(stop_before_pixels=True, specific_tags=...)``): about a
millisecond per file, in threads. Ages such as ``045Y``, ``006M``, ``002W`` and ``010D`` become years.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from covidcxr.data.imageio import is_dicom
from covidcxr.data.metadata import COLUMNS, MetadataReport, missing_value, normalise_columns
from covidcxr.data.pool import default_workers

TAGS = {"patient_id": "PatientID", "study_id": "StudyInstanceUID", "view": "ViewPosition", "sex": "PatientSex",
        "age": "PatientAge", "site": "InstitutionName", "manufacturer": "Manufacturer"}


def read_tags(path: str) -> dict[str, str] | None:
    """{manifest column: raw tag text} of one DICOM file ('' where the tag is absent); None if unreadable."""
    import pydicom  # imported here: only an index holding DICOM files needs it

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAGS.values()))
    except Exception:
        return None
    out = {}
    for col, tag in TAGS.items():
        value = ds.get(tag, "")
        value = getattr(value, "value", value)
        out[col] = "" if value is None else str(value)
    return out


def dicom_metadata(paths: list[str], workers: int | None = None) -> tuple[dict[str, list[str]], MetadataReport]:
    """Normalised ``COLUMNS`` per path, from the tags of the DICOM files among ``paths`` (other files:
    unknown), and the report (source "none" where there is no DICOM file)."""
    idx = [i for i, p in enumerate(paths) if is_dicom(p)]
    if not idx:
        values, _ = normalise_columns({}, len(paths))
        return values, MetadataReport()
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as ex:
        tags = list(ex.map(read_tags, [paths[i] for i in idx], chunksize=32))
    raw = {c: [""] * len(paths) for c in COLUMNS}
    unreadable = []
    for i, t in zip(idx, tags):
        if t is None:
            unreadable.append(paths[i])
            continue
        for c in COLUMNS:
            raw[c][i] = t[c]
    values, invalid = normalise_columns(raw, len(paths))
    found = {c: TAGS[c] for c in COLUMNS if any(values[c][i] != missing_value(c) for i in idx)}
    return values, MetadataReport(source=f"DICOM tags of {len(idx)} file(s)", columns=found, matched=len(idx),
                                  invalid=invalid, unreadable=unreadable)

"""Per-image metadata of a manifest: patient, study, view, sex, age, site, scanner maker.

The manifest's metadata columns (``COLUMNS``) always exist once read. ``patient_id`` and
``study_id`` are empty where unknown (an empty ID groups nothing); the others hold ``UNKNOWN``
where unknown, never dropped. ``age`` is in years (a decimal number as text); ``sex`` is one of
``SEXES`` and ``view`` one of ``VIEWS``.
"""
from __future__ import annotations

COLUMNS = ("patient_id", "study_id", "view", "sex", "age", "site", "manufacturer")
UNKNOWN = "unknown"
SEXES = ("F", "M", "other", UNKNOWN)
VIEWS = ("PA", "AP", "LATERAL", "other", UNKNOWN)
ID_COLUMNS = ("patient_id", "study_id")     # empty where unknown

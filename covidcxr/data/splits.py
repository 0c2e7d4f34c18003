"""Stratified, seeded, group-aware train/val/test splits.

Split groups (``split_groups``) are the union of near-duplicate groups and patient groups: all films
of one patient, and every near-duplicate of any of them, move between splits as one unit.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from covidcxr.data.dedup import UnionFind
from covidcxr.errors import ConfigError

SPLITS = ("train", "val", "test")


def parse_fractions(text: str | None) -> tuple[float, ...]:
    """'0.8,0.2' -> (0.8, 0.2, 0.0); '0.7,0.15,0.15' -> as is."""
    if text is None:
        text = "0.7,0.15,0.15"
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--split {text!r}: expected fractions like 0.8,0.2 or 0.7,0.15,0.15") from None
    if len(parts) not in (2, 3) or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] <= 0:
        raise ConfigError(f"--split {text!r}: give 2 (train,val) or 3 (train,val,test) "
                          f"non-negative fractions summing to 1")
    return parts + (0.0,) * (3 - len(parts))


def split_groups(dup_group, patient_ids) -> np.ndarray:
    """The split group of each image: the union (union-find) of its near-duplicate group
    (``dup_group``: a group id per image, as ``group_duplicates`` gives) and its patient (images with
    the same non-empty ``patient_ids`` entry). Each group is named by its smallest member index."""
    dup = np.asarray(dup_group, dtype=np.int64)
    uf = UnionFind(len(dup))
    first: dict[int, int] = {}
    for i, g in enumerate(dup.tolist()):
        uf.union(i, first.setdefault(g, i))
    seen: dict[str, int] = {}
    for i, p in enumerate(patient_ids):
        if p:
            uf.union(i, seen.setdefault(p, i))
    return np.array([uf.find(i) for i in range(len(dup))], dtype=np.int64)


def stratified_group_split(labels: list[str], groups: list[int], fractions: tuple[float, ...],
                           seed: int) -> list[str]:
    """Assign each image a split so that whole groups move together.

    Within each class (a group's class is its most common label), groups are
    shuffled with ``seed`` and dealt, largest first, to the split furthest below
    its target count. Deterministic for the same inputs.
    """
    fr = np.asarray(fractions, dtype=float)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    group_label = {g: Counter(labels[i] for i in m).most_common(1)[0][0] for g, m in members.items()}
    rng = np.random.default_rng(seed)
    out = [""] * len(labels)
    for cls in sorted(set(group_label.values())):
        gs = sorted(g for g, lab in group_label.items() if lab == cls)
        rng.shuffle(gs)
        gs.sort(key=lambda g: -len(members[g]))  # stable: large groups first, else shuffled
        total = sum(len(members[g]) for g in gs)
        target = fr * total
        count = np.zeros(len(fr))
        for g in gs:
            deficit = np.where(fr > 0, target - count, -np.inf)
            k = int(np.argmax(deficit))
            count[k] += len(members[g])
            for i in members[g]:
                out[i] = SPLITS[k]
    return out

"""Exact and near-duplicate grouping without a quadratic Python loop.

Candidates come from 64-bit perceptual hashes compared in vectorised blocks
(XOR + popcount in NumPy), against both the plain and the left-right mirrored
hash. Each candidate pair is then confirmed on 32x32 thumbnails with the two
tests the dataset curators used (with tighter thresholds): mean absolute
difference below ``max_mad`` or Pearson correlation of at least ``min_corr``,
plain or mirrored.
Connected pairs form groups (union-find); a group must never straddle splits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DedupResult:
    group: np.ndarray            # group id per image (smallest member index)
    exact_pairs: int
    near_pairs: int
    mirrored_pairs: int

    @property
    def duplicate_groups(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(self.group.tolist()):
            groups.setdefault(g, []).append(i)
        return {g: m for g, m in groups.items() if len(m) > 1}


class UnionFind:
    """Disjoint sets over 0..n-1; each set's root is its smallest member."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def hamming_candidates(hashes: np.ndarray, mirror: np.ndarray, max_distance: int,
                       block: int = 2048) -> np.ndarray:
    """Pairs (i < j) whose hashes differ in at most ``max_distance`` bits,
    comparing i's hash with j's plain and j's mirrored hash. Returns (K, 2)."""
    h = np.asarray(hashes, dtype=np.uint64)
    m = np.asarray(mirror, dtype=np.uint64)
    n = len(h)
    out = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        hb = h[start:stop, None]
        d = np.minimum(np.bitwise_count(hb ^ h[None, :]), np.bitwise_count(hb ^ m[None, :]))
        rows, cols = np.nonzero(d <= max_distance)
        keep = cols > rows + start
        if keep.any():
            out.append(np.stack([rows[keep] + start, cols[keep]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _confirm(thumbs: np.ndarray, pairs: np.ndarray, max_mad: float, min_corr: float):
    """Vectorised thumbnail tests on candidate pairs -> (is_dup, is_mirrored)."""
    if len(pairs) == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    t = thumbs.astype(np.float32) / 255.0
    a = t[pairs[:, 0]]
    results = []
    for b in (t[pairs[:, 1]], t[pairs[:, 1]][:, :, ::-1]):
        mad = np.abs(a - b).mean(axis=(1, 2))
        az = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
        bz = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
        denom = np.sqrt((az ** 2).sum(1) * (bz ** 2).sum(1)) + 1e-12
        corr = (az * bz).sum(1) / denom
        results.append((mad < max_mad) | (corr >= min_corr))
    plain, mirrored = results
    return plain | mirrored, mirrored & ~plain


def group_duplicates(sha256: list[str], phash: np.ndarray, phash_mirror: np.ndarray,
                     thumbs: np.ndarray, max_hamming: int = 12, max_mad: float = 0.04,
                     min_corr: float = 0.98) -> DedupResult:
    """Thresholds measured on real CXRs (see benchmarks/RESULTS.md): a true same-film pair in
    COVID-QU-Ex scored MAD 0.026 (corr 0.90); the closest non-duplicate pair among 900 COVID-QU-Ex
    images scored MAD 0.051 and the highest correlation 0.953."""
    n = len(sha256)
    uf = UnionFind(n)
    first: dict[str, int] = {}
    exact = 0
    for i, s in enumerate(sha256):
        if s in first:
            uf.union(first[s], i)
            exact += 1
        else:
            first[s] = i
    pairs = hamming_candidates(phash, phash_mirror, max_hamming)
    is_dup, is_mirror = _confirm(thumbs, pairs, max_mad, min_corr)
    near = 0
    for (a, b), dup in zip(pairs.tolist(), is_dup.tolist()):
        if dup and sha256[a] != sha256[b]:
            uf.union(a, b)
            near += 1
    group = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    return DedupResult(group, exact, near, int(is_mirror.sum()))


def _pair_tests(a: np.ndarray, b: np.ndarray, max_mad: float, min_corr: float) -> np.ndarray:
    """Thumbnail tests on aligned stacks a[i] vs b[i] (uint8): MAD below or correlation at least."""
    a, b = a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0
    mad = np.abs(a - b).mean(axis=(1, 2))
    az = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    bz = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    corr = (az * bz).sum(1) / (np.sqrt((az ** 2).sum(1) * (bz ** 2).sum(1)) + 1e-12)
    return (mad < max_mad) | (corr >= min_corr)


def match_reference(sha: np.ndarray, phash: np.ndarray, phash_mirror: np.ndarray, thumbs: np.ndarray,
                    ref_sha: np.ndarray, ref_phash: np.ndarray, ref_mirror: np.ndarray, ref_thumbs: np.ndarray,
                    max_hamming: int = 12, max_mad: float = 0.04, min_corr: float = 0.98, block: int = 1024):
    """For each query image, the index of a matching reference image (-1: none) and how it matched
    ('exact' bytes, 'near' duplicate, 'mirrored' near duplicate, ''). The same candidate and
    confirmation tests as ``group_duplicates`` (here on the thumbnails both sides carry)."""
    n = len(sha)
    idx, kind = np.full(n, -1, np.int64), np.full(n, "", dtype=object)
    if not len(ref_sha) or not n:
        return idx, kind
    ref_keys = {bytes(r): j for j, r in enumerate(ref_sha)}
    for i in range(n):
        j = ref_keys.get(bytes(sha[i]))
        if j is not None:
            idx[i], kind[i] = j, "exact"
    rh, rm = np.asarray(ref_phash, np.uint64), np.asarray(ref_mirror, np.uint64)
    for start in range(0, n, block):
        q = np.asarray(phash[start:start + block], np.uint64)[:, None]
        d_plain, d_mirror = np.bitwise_count(q ^ rh[None, :]), np.bitwise_count(q ^ rm[None, :])
        rows, cols = np.nonzero(np.minimum(d_plain, d_mirror) <= max_hamming)
        rows = rows + start
        todo = kind[rows] == ""
        rows, cols = rows[todo], cols[todo]
        if not len(rows):
            continue
        plain = _pair_tests(thumbs[rows], ref_thumbs[cols], max_mad, min_corr)
        mirrored = _pair_tests(thumbs[rows], ref_thumbs[cols][:, :, ::-1], max_mad, min_corr) & ~plain
        for r, c, p, m in zip(rows.tolist(), cols.tolist(), plain.tolist(), mirrored.tolist()):
            if kind[r] == "" and (p or m):
                idx[r], kind[r] = c, "near" if p else "mirrored"
    return idx, kind

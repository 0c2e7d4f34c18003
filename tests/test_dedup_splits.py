import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.data.dedup import group_duplicates, hamming_candidates
from covidcxr.data.manifest import build_manifest
from covidcxr.data.splits import parse_fractions, stratified_group_split
from covidcxr.errors import ConfigError


def test_hamming_blocks_match_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    h[50] = h[7] ^ np.uint64(0b1011)  # 3 bits apart
    m = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    m[200] = h[9]  # 200's mirror equals 9
    got = {tuple(p) for p in hamming_candidates(h, m, 4, block=64).tolist()}
    brute = set()
    for i in range(300):
        for j in range(i + 1, 300):
            d = min(bin(int(h[i] ^ h[j])).count("1"), bin(int(h[i] ^ m[j])).count("1"))
            if d <= 4:
                brute.add((i, j))
    assert got == brute and (7, 50) in got and (9, 200) in got


def test_planted_mirrored_and_resized_duplicates_share_a_split(synth_copy):
    src = synth_copy / "COVID" / "images" / "COVID-1.png"
    img = Image.open(src)
    img.transpose(Image.FLIP_LEFT_RIGHT).save(synth_copy / "COVID" / "images" / "COVID-mirror.png")
    img.resize((50, 50)).save(synth_copy / "COVID" / "images" / "COVID-small.jpg", quality=90)
    df, report = build_manifest(synth_copy, (0.5, 0.25, 0.25), seed=1, progress=False)
    groups = report.dedup.duplicate_groups
    paths = {g: sorted(df["path"][m].map(lambda p: p.rsplit("/", 1)[-1])) for g, m in groups.items()}
    assert ["COVID-1.png", "COVID-mirror.png", "COVID-small.jpg"] in paths.values()
    assert report.dedup.mirrored_pairs >= 1
    for members in groups.values():
        assert df["split"][members].nunique() == 1
    assert report.crossing_groups == []


def test_stratified_split_is_seeded_and_balanced():
    labels = ["a"] * 70 + ["b"] * 30
    groups = list(range(100))
    s1 = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=5)
    s2 = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=5)
    s3 = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=6)
    assert s1 == s2 and s1 != s3
    t = pd.crosstab(pd.Series(labels), pd.Series(s1))
    assert t.loc["a", "train"] == 49 and t.loc["b", "train"] == 21
    assert t.loc["b", "val"] in (4, 5) and t.loc["b", "test"] in (4, 5)


def test_groups_never_straddle():
    labels = ["a"] * 40
    groups = [i // 4 for i in range(40)]  # groups of 4
    s = stratified_group_split(labels, groups, (0.8, 0.2), seed=0)
    for g in range(10):
        assert len({s[i] for i in range(40) if groups[i] == g}) == 1
    assert "test" not in s


def test_group_duplicates_exact_copies():
    thumbs = np.random.default_rng(0).integers(0, 255, (3, 32, 32)).astype(np.uint8)
    res = group_duplicates(["x", "x", "y"], np.array([1, 1, 99], np.uint64), np.array([5, 5, 7], np.uint64), thumbs)
    assert res.group.tolist()[:2] == [0, 0] and res.group[2] == 2 and res.exact_pairs == 1


@pytest.mark.parametrize("bad", ["0.5", "0.6,0.6", "a,b", "0,0.5,0.5", "0.5,0.2,0.2,0.1"])
def test_bad_split_strings(bad):
    with pytest.raises(ConfigError):
        parse_fractions(bad)


def test_split_two_parts():
    assert parse_fractions("0.8,0.2") == (0.8, 0.2, 0.0)

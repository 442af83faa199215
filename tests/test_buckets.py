"""Bucket rule of export/ALGORITHM.md section 2.2."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from interactive_features.runtime.buckets import (
    COMMON_RATIOS,
    DEFAULT_AREA,
    MIN_SIDE,
    STRIDE,
    all_buckets,
    bucket_for,
    common_buckets,
    format_size,
    max_side,
    parse_size,
)


def float_rule(width: int, height: int, area: int = DEFAULT_AREA) -> tuple[int, int]:
    """The contract's formula verbatim, in floating point (fine away from rounding ties)."""
    r = width / height
    s, m, big_m = STRIDE, MIN_SIDE, max_side(area)
    w = s * math.floor(math.sqrt(area * r) / s + 0.5)
    h = s * math.floor(math.sqrt(area / r) / s + 0.5)
    return min(max(w, m), big_m), min(max(h, m), big_m)


def test_constants_and_max_side() -> None:
    assert (DEFAULT_AREA, STRIDE, MIN_SIDE) == (512 * 512, 32, 224)
    assert max_side(512 * 512) == 1184
    assert max_side() == 1184
    # M = s * floor(A / (m*s) + 1/2) for a few other areas.
    for area in (256 * 256, 384 * 384, 640 * 640, 1024 * 1024):
        assert max_side(area) == STRIDE * math.floor(area / (MIN_SIDE * STRIDE) + 0.5)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((500, 375), (576, 448)),
        ((375, 500), (448, 576)),
        ((640, 360), (672, 384)),
        ((512, 512), (512, 512)),
        ((4000, 3000), (576, 448)),
        ((1920, 1080), (672, 384)),
        ((600, 400), (640, 416)),
    ],
)
def test_contract_examples(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert bucket_for(*size) == bucket


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((1, 1), (512, 512)),
        ((10, 10), (512, 512)),
        ((5000, 200), (1184, 224)),
        ((200, 5000), (224, 1184)),
        ((1, 100000), (224, 1184)),
        ((100000, 1), (1184, 224)),
    ],
)
def test_extremes_are_clamped(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    w, h = bucket_for(*size)
    assert (w, h) == bucket
    assert MIN_SIDE <= w <= max_side() and MIN_SIDE <= h <= max_side()
    assert w % STRIDE == 0 and h % STRIDE == 0


def test_exact_rounding_ties() -> None:
    # sqrt(A * 1089/1024) = 528 = 16.5 * 32 exactly: a tie, which rounds half up to 17 * 32.
    assert bucket_for(1089, 1024)[0] == 544
    assert bucket_for(1088, 1024)[0] == 512
    # Same tie on the height side.
    assert bucket_for(1024, 1089)[1] == 544
    # A tie far from 1: sqrt(A * r) = 31.5 * 32 = 1008 at r = 63^2 / 1024.
    assert bucket_for(63 * 63, 1024)[0] == 1024
    assert bucket_for(63 * 63 - 1, 1024)[0] == 992


def test_agrees_with_float_formula_on_a_grid() -> None:
    for w in range(1, 400, 3):
        for h in range(1, 400, 7):
            assert bucket_for(w, h) == float_rule(w, h), (w, h)


def test_scale_invariant() -> None:
    for w, h in [(500, 375), (3, 7), (640, 360), (1, 5)]:
        assert bucket_for(w, h) == bucket_for(17 * w, 17 * h)


@pytest.mark.parametrize("bad", [0, -1, 1.5, 512.0, "512", None, True])
def test_bad_sizes_raise(bad: object) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        bucket_for(bad, 100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="height"):
        bucket_for(100, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="area"):
        bucket_for(100, 100, area=bad)  # type: ignore[arg-type]


def test_all_buckets_count_and_order() -> None:
    buckets = all_buckets()
    assert len(buckets) == 61
    assert len(set(buckets)) == 61
    ratios = [Fraction(w, h) for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == 61
    assert buckets[0] == (224, 1184) and buckets[-1] == (1184, 224)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % STRIDE == 0 and h % STRIDE == 0
        assert min(w, h) >= MIN_SIDE and max(w, h) <= 1184
        # The rule is symmetric in width and height.
        assert (h, w) in buckets


def test_every_bucket_is_reachable_with_a_modest_image() -> None:
    # Each listed bucket comes from some real image size (found here by search).
    reached = {bucket_for(w, h) for w in range(1, 260) for h in range(1, 260)}
    assert reached == set(all_buckets())


def test_brute_force_results_are_in_all_buckets() -> None:
    known = set(all_buckets())
    for w in range(1, 700, 2):
        for h in range(1, 700, 3):
            assert bucket_for(w, h) in known, (w, h)


@pytest.mark.parametrize("area", [224 * 224, 256 * 256, 300 * 300, 384 * 384])
def test_all_buckets_other_areas(area: int) -> None:
    known = set(all_buckets(area))
    reached = {bucket_for(w, h, area) for w in range(1, 300, 2) for h in range(1, 300, 2)}
    assert reached == known
    if area == 224 * 224:
        assert known == {(224, 224)}


def test_common_buckets() -> None:
    assert COMMON_RATIOS == ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
    assert common_buckets() == [
        (512, 512),
        (576, 448),
        (448, 576),
        (640, 416),
        (416, 640),
        (672, 384),
        (384, 672),
    ]
    assert set(common_buckets()) <= set(all_buckets())


def test_parse_and_format_size() -> None:
    assert parse_size("576x448") == (576, 448)
    assert parse_size(" 576 X 448 ") == (576, 448)
    assert format_size((576, 448)) == "576x448"
    for size in all_buckets():
        assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["", "576", "576x", "x448", "576x448x3", "0x448", "-5x4", "a x b"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="576x448"):
        parse_size(text)

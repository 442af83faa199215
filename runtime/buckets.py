"""Image-size buckets: the (W, H) every input image is resized to (export/ALGORITHM.md section 2.2).

Each bucket keeps roughly the image's aspect ratio at roughly a fixed pixel area ``A``, with both
sides multiples of ``STRIDE`` (so every pooling stage divides evenly) and clamped to
``[MIN_SIDE, max_side(A)]``:

    r = W0 / H0
    W = clamp(s * floor(sqrt(A * r) / s + 1/2), m, M)
    H = clamp(s * floor(sqrt(A / r) / s + 1/2), m, M)
    M = s * floor(A / (m * s) + 1/2)

All arithmetic here is exact integer arithmetic: a float ``sqrt`` would put images whose ratio
lands exactly on a rounding tie into either neighbouring bucket depending on rounding error, and
an engine built for one bucket would then be asked for the other.
"""

from __future__ import annotations

import math
from fractions import Fraction

DEFAULT_AREA = 512 * 512
STRIDE = 32
# fc-6 is a 7x7 valid conv on pool-5 (stride 32), so no side may be below 7 * 32.
MIN_SIDE = 224

COMMON_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 4),
    (3, 2),
    (2, 3),
    (16, 9),
    (9, 16),
)


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass; True as a size is always a bug upstream.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def max_side(area: int = DEFAULT_AREA) -> int:
    """Largest bucket side for ``area``: ``STRIDE * floor(area / (MIN_SIDE * STRIDE) + 1/2)``.

    1184 at the default area. Raises ValueError unless ``area`` is a positive integer.
    """
    area = _check_positive_int("area", area)
    # floor(A/(m*s) + 1/2) == floor((2A + m*s) / (2*m*s)), exactly.
    k = (2 * area + MIN_SIDE * STRIDE) // (2 * MIN_SIDE * STRIDE)
    # A tiny area would give a maximum below the minimum; the minimum wins (fc-6 needs it).
    return max(STRIDE * k, MIN_SIDE)


def _rounded_steps(num: int, den: int, area: int) -> int:
    """``floor(sqrt(area * num / den) / STRIDE + 1/2)``, exactly.

    That floor is the largest k >= 0 with ``k - 1/2 <= sqrt(area*num/den) / s``; for k >= 1 both
    sides are non-negative, so squaring gives ``(2k - 1)^2 * s^2 * den <= 4 * area * num`` (k = 0
    always qualifies). For an integer n, ``n^2 <= q`` iff ``n <= isqrt(floor(q))``, so ``2k - 1``
    is bounded by ``t = isqrt(4*area*num // (s^2*den))``, and the largest k is ``(t + 1) // 2``.
    """
    t = math.isqrt((4 * area * num) // (STRIDE * STRIDE * den))
    return (t + 1) // 2


def _clamp(value: int, area: int) -> int:
    return min(max(value, MIN_SIDE), max_side(area))


def bucket_for(width: int, height: int, area: int = DEFAULT_AREA) -> tuple[int, int]:
    """The bucket ``(W, H)`` for an image displayed at ``width`` x ``height`` pixels.

    Pass the size after EXIF orientation (what a viewer shows), not the stored size. Both sides of
    the result are multiples of ``STRIDE`` in ``[MIN_SIDE, max_side(area)]``. Raises ValueError
    naming the offending value unless width, height and area are positive integers.
    """
    width = _check_positive_int("width", width)
    height = _check_positive_int("height", height)
    area = _check_positive_int("area", area)
    w = STRIDE * _rounded_steps(width, height, area)
    h = STRIDE * _rounded_steps(height, width, area)
    return _clamp(w, area), _clamp(h, area)


def _breakpoints(area: int) -> set[Fraction]:
    """Every aspect ratio r at which W(r) or H(r) can change.

    W's rounding steps from k - 1 to k where ``sqrt(A*r)/s + 1/2 = k``, i.e. at
    ``r = ((2k - 1) s)^2 / (4A)``; H's, by symmetry, at the reciprocal. Steps with ``s*k`` beyond
    ``max_side + s`` only move within the clamped region, so they are left out.
    """
    k_max = max_side(area) // STRIDE + 1
    points: set[Fraction] = set()
    for k in range(1, k_max + 1):
        r = Fraction((2 * k - 1) ** 2 * STRIDE * STRIDE, 4 * area)
        points.update((r, 1 / r))
    return points


def all_buckets(area: int = DEFAULT_AREA) -> list[tuple[int, int]]:
    """Every bucket ``bucket_for`` can return for some image, at ``area``.

    Sorted by aspect ratio W/H ascending: tallest (portrait) first, widest last. The list is exact:
    W and H are step functions of r = width/height (W non-decreasing, H non-increasing), so the rule
    is evaluated at every breakpoint, between consecutive breakpoints and beyond both ends; every
    ratio used is rational, i.e. a real image size. 61 buckets at 512*512.
    """
    area = _check_positive_int("area", area)
    points = sorted(_breakpoints(area))
    samples = [points[0] / 2, points[-1] * 2]
    samples += points
    samples += [(a + b) / 2 for a, b in zip(points, points[1:], strict=False)]
    buckets = {bucket_for(r.numerator, r.denominator, area) for r in samples}
    # Distinct buckets have distinct W/H (W never falls and H never rises as r grows), so this
    # order is total.
    return sorted(buckets, key=lambda wh: Fraction(wh[0], wh[1]))


def common_buckets(area: int = DEFAULT_AREA) -> list[tuple[int, int]]:
    """The buckets of ``COMMON_RATIOS`` (1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16), in that order."""
    return [bucket_for(w, h, area) for w, h in COMMON_RATIOS]


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (e.g. ``"576x448"``; ``X`` and surrounding spaces allowed) into ``(W, H)``.

    Raises ValueError quoting the text unless it is two positive decimal integers joined by x.
    """
    parts = text.strip().lower().split("x")
    if len(parts) == 2:
        w, h = (p.strip() for p in parts)
        if (
            w.isascii()
            and h.isascii()
            and w.isdigit()
            and h.isdigit()
            and int(w) > 0
            and int(h) > 0
        ):
            return int(w), int(h)
    raise ValueError(f"expected a size like '576x448' (width x height), got {text!r}")


def format_size(size: tuple[int, int]) -> str:
    """``(576, 448)`` -> ``"576x448"``, the inverse of ``parse_size``."""
    w, h = size
    return f"{w}x{h}"

"""Small statistics for evaluation reports: Wilson score intervals and the exact McNemar test (no SciPy).

Example:
    >>> from ssah_plugin.evaluation.stats import wilson_interval, mcnemar_exact
    >>> lo, hi = wilson_interval(3, 10)
    >>> round(lo, 3), round(hi, 3)
    (0.108, 0.603)
    >>> mcnemar_exact([1, 1, 0, 0], [0, 0, 0, 1])
    {'n': 4, 'b01': 1, 'b10': 2, 'n_discordant': 3, 'p': 1.0}
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["wilson_interval", "mcnemar_exact", "rate_summary"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (``z = 1.96``: 95%). ``(nan, nan)`` when ``n == 0``.

    Raises ``ValueError`` unless ``0 <= k <= n``.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def rate_summary(flags: Sequence[int | bool]) -> dict:
    """``{"n", "k", "rate", "wilson95": [lo, hi]}`` of 0/1 flags (the JSON shape used in every report)."""
    n, k = len(flags), sum(int(bool(f)) for f in flags)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "k": k, "rate": (k / n) if n else float("nan"), "wilson95": [lo, hi]}


def mcnemar_exact(a: Sequence[int | bool], b: Sequence[int | bool]) -> dict:
    """Exact two-sided McNemar test of paired 0/1 outcomes (the same prompts scored for two checkpoints).

    ``b01`` counts pairs with ``a == 0, b == 1``, ``b10`` pairs with ``a == 1, b == 0``. Under the null hypothesis
    the discordant pairs split Binomial(b01 + b10, 1/2); ``p`` is the two-sided exact p-value
    ``min(1, 2 * P(X <= min(b01, b10)))`` (1.0 without discordant pairs).
    """
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact needs paired outcomes of equal length, got {len(a)} and {len(b)}")
    b01 = sum(1 for x, y in zip(a, b) if not x and y)
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    m = b01 + b10
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b01, b10) + 1)) / 2 ** m) if m else 1.0  # exact ints
    return {"n": len(a), "b01": b01, "b10": b10, "n_discordant": m, "p": p}

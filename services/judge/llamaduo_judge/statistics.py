"""The judge's statistics: a bootstrap CI of the mean, Spearman's rank correlation, Krippendorff's alpha (interval)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_SEED = 20240826
"""Seed of the bootstrap: fixed, so the same judgments always give the same interval."""
_CHUNK_VALUES = 1 << 21
"""Resampled values drawn at once: bounds the bootstrap's memory on large test splits (~16 MiB of indices)."""


def bootstrap_mean_ci(
    values: Sequence[float], *, confidence: float = 0.95, samples: int = 2000, seed: int = DEFAULT_SEED
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (resampled with replacement, seeded)."""
    if not values:
        raise ValueError("a confidence interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    data = np.asarray(values, dtype=np.float64)
    n = data.size
    mean = float(data.mean())
    if n == 1 or bool(np.all(data == data[0])):
        # Every resample is the sample itself: the interval is the point.
        return mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    chunk = max(1, _CHUNK_VALUES // n)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = (float(q) for q in np.quantile(means, [tail, 1.0 - tail]))
    # Rounding in the resampled sums may leave a near-degenerate interval a hair beside the mean; it must hold it.
    return min(low, mean), max(high, mean)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values`, ties sharing the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        shared = (start + stop) / 2.0 + 1.0
        for position in range(start, stop + 1):
            ranks[order[position]] = shared
        start = stop + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the average ranks); None when either side does not vary."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = math.fsum(rx) / len(rx), math.fsum(ry) / len(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in rx)
    syy = math.fsum((b - my) ** 2 for b in ry)
    if sxx == 0.0 or syy == 0.0:
        return None
    # Clipped: rounding may push a perfect correlation a hair beyond +-1.
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def krippendorff_alpha_interval(ratings: Sequence[Sequence[float | None]]) -> float | None:
    """Krippendorff's alpha with the interval metric; rows are coders, columns units, None (or NaN) is missing.

    Only units with at least two values count (they are the pairable ones). None when there is nothing to pair or
    the pairable values do not vary at all (alpha is undefined then).
    """
    width = {len(row) for row in ratings}
    if len(width) > 1:
        raise ValueError("every coder's row must cover the same units")
    units = width.pop() if width else 0
    sum_all = sum_sq_all = 0.0
    count = 0
    disagreement = 0.0
    for unit in range(units):
        column = [float(v) for row in ratings if (v := row[unit]) is not None and not math.isnan(float(v))]
        m = len(column)
        if m < 2:
            continue
        s = math.fsum(column)
        sq = math.fsum(v * v for v in column)
        # Sum over ordered pairs i != j of (v_i - v_j)^2 is 2*m*sum(v^2) - 2*(sum v)^2, weighted 1/(m - 1).
        disagreement += (2.0 * m * sq - 2.0 * s * s) / (m - 1)
        sum_all += s
        sum_sq_all += sq
        count += m
    if count < 2:
        return None
    observed = disagreement / count
    expected = (2.0 * count * sum_sq_all - 2.0 * sum_all * sum_all) / (count * (count - 1))
    if expected <= 1e-12 * max(1.0, sum_sq_all / count):
        return None
    return 1.0 - observed / expected

"""The judge's statistics against hand-computed values: bootstrap CI, ranks, Spearman, Krippendorff's alpha."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from llamaduo_judge.statistics import average_ranks, bootstrap_mean_ci, krippendorff_alpha_interval, spearman

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the worked example with missing values:
# 4 observers, 12 units; published alpha (interval) = 0.849.
_: None = None
KRIPPENDORFF_2011: list[list[float | None]] = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
    [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _],
]


# ---- bootstrap CI of the mean ----


def test_bootstrap_of_two_points_has_the_hand_computed_quantiles() -> None:
    # Resampling [0, 100] gives means 0, 50, 100 with probabilities 1/4, 1/2, 1/4: the 95% interval spans them all
    # and the 40% interval (quantiles 0.3 and 0.7) is the middle value alone.
    assert bootstrap_mean_ci([0.0, 100.0], confidence=0.95, samples=4000) == (0.0, 100.0)
    assert bootstrap_mean_ci([0.0, 100.0], confidence=0.40, samples=4000) == (50.0, 50.0)


def test_bootstrap_of_one_value_or_constant_values_is_the_point() -> None:
    assert bootstrap_mean_ci([72.5]) == (72.5, 72.5)
    assert bootstrap_mean_ci([100 / 3] * 7) == pytest.approx((100 / 3, 100 / 3))
    low, high = bootstrap_mean_ci([100 / 3] * 7)
    assert low <= statistics.fmean([100 / 3] * 7) <= high


def test_bootstrap_is_deterministic_contains_the_mean_and_narrows_with_more_data() -> None:
    rng = random.Random(7)
    values = [float(rng.randint(1, 100)) for _ in range(40)]
    first = bootstrap_mean_ci(values, confidence=0.95, samples=2000)
    assert bootstrap_mean_ci(values, confidence=0.95, samples=2000) == first
    assert first[0] < statistics.fmean(values) < first[1]
    widths = [(lambda ci: ci[1] - ci[0])(bootstrap_mean_ci(values * k, samples=2000)) for k in (1, 4, 16)]
    assert widths[0] > widths[1] > widths[2]
    # The standard error shrinks as 1/sqrt(n): 4x the data, about half the width.
    assert widths[1] / widths[0] == pytest.approx(0.5, abs=0.08)
    assert bootstrap_mean_ci(values, confidence=0.99)[1] - bootstrap_mean_ci(values, confidence=0.99)[0] > widths[0]


def test_bootstrap_matches_the_normal_approximation_on_a_large_sample() -> None:
    rng = random.Random(3)
    values = [float(rng.randint(1, 100)) for _ in range(2000)]
    mean = statistics.fmean(values)
    half = 1.959964 * statistics.pstdev(values) / math.sqrt(len(values))
    low, high = bootstrap_mean_ci(values, confidence=0.95, samples=4000)
    assert low == pytest.approx(mean - half, abs=0.15 * half)
    assert high == pytest.approx(mean + half, abs=0.15 * half)


def test_bootstrap_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1.0, 2.0], confidence=1.0)


# ---- ranks and Spearman ----


def test_average_ranks_share_the_mean_of_tied_positions() -> None:
    assert average_ranks([10, 20, 20, 30, 20]) == [1.0, 3.0, 3.0, 5.0, 3.0]
    assert average_ranks([3, 1, 2]) == [3.0, 1.0, 2.0]
    assert average_ranks([]) == []


def test_spearman_hand_computed() -> None:
    assert spearman([1, 2, 3, 4, 5], [50, 40, 30, 20, 10]) == -1.0
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == 1.0  # monotone, not linear
    # Ranks [1, 2.5, 2.5, 4] against [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    # Without ties, 1 - 6 * sum(d^2) / (n (n^2 - 1)): d = (1, -1, -1, 1) gives 1 - 24/60.
    assert spearman([95, 30, 85, 50], [80, 40, 90, 20]) == pytest.approx(0.6)


def test_spearman_is_undefined_without_variation() -> None:
    assert spearman([5, 5, 5], [1, 2, 3]) is None
    assert spearman([1], [2]) is None
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2], [1, 2, 3])


# ---- Krippendorff's alpha, interval metric ----


def test_krippendorff_textbook_example_with_missing_values() -> None:
    assert krippendorff_alpha_interval(KRIPPENDORFF_2011) == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_hand_computed_small_cases() -> None:
    # Unit 3 has one value and is not pairable. Pairable values 1, 1, 2, 3 (n = 4): D_o = 2/4 (unit 2 only),
    # D_e = (2*4*15 - 2*7^2) / (4*3) = 22/12, so alpha = 1 - (1/2) / (22/12) = 8/11.
    assert krippendorff_alpha_interval([[1, 2, None], [1, 3, 3]]) == pytest.approx(8 / 11)
    # Two coders who always swap: D_o = 1, D_e = 2/3, alpha = -1/2 (systematic disagreement).
    assert krippendorff_alpha_interval([[1, 2], [2, 1]]) == pytest.approx(-0.5)
    # NaN counts as missing, like None.
    assert krippendorff_alpha_interval([[1, 2, math.nan], [1, 3, 3]]) == pytest.approx(8 / 11)


def test_krippendorff_perfect_agreement_is_one_and_no_variation_is_undefined() -> None:
    assert krippendorff_alpha_interval([[10, 50, 90, 70], [10, 50, 90, 70], [10, 50, 90, None]]) == 1.0
    assert krippendorff_alpha_interval([[80, 80], [80, 80]]) is None
    assert krippendorff_alpha_interval([[80, None], [None, 70]]) is None  # nothing pairable
    assert krippendorff_alpha_interval([]) is None
    with pytest.raises(ValueError, match="same units"):
        krippendorff_alpha_interval([[1, 2], [1]])

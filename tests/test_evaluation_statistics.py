"""Bootstrap intervals and paired tests (nnunet_synth.evaluation.statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_synth.evaluation.statistics import (
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    describe,
    paired_comparison,
)


def dice_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Skewed values in [0, 1] with known mean 0.75 (Beta(6, 2))."""
    return rng.beta(6.0, 2.0, size=n)


@pytest.mark.parametrize("confidence,low,high", [(0.95, 0.90, 0.99), (0.80, 0.72, 0.88)])
def test_bootstrap_coverage_matches_nominal(confidence, low, high):
    """In repeated samples the interval covers the true mean at about the nominal rate."""
    rng = np.random.default_rng(12345)
    reps, covered = 300, 0
    for rep in range(reps):
        lo, hi = bootstrap_mean_ci(dice_like(rng, 40), n_resamples=1000, confidence=confidence, seed=rep)
        covered += lo <= 0.75 <= hi
    assert low <= covered / reps <= high


def test_ratio_bootstrap_coverage():
    """Cluster bootstrap of a pooled mean over several items per case (e.g. slices) covers the truth."""
    rng = np.random.default_rng(7)
    reps, covered = 200, 0
    for rep in range(reps):
        counts = rng.integers(1, 6, size=30)
        case_effect = rng.normal(0.0, 0.1, size=30)
        sums = np.array([np.sum(0.7 + e + rng.normal(0.0, 0.1, size=c)) for c, e in zip(counts, case_effect,
                                                                                      strict=True)])
        lo, hi = bootstrap_ratio_ci(sums, counts, n_resamples=1000, seed=rep)
        covered += lo <= 0.7 <= hi
    assert 0.88 <= covered / reps <= 0.99


def test_bootstrap_interval_properties():
    values = np.array([0.6, 0.7, 0.8, 0.9, np.nan, 0.65, 0.85])
    lo, hi = bootstrap_mean_ci(values, n_resamples=2000, seed=3)
    mean = np.nanmean(values)
    assert lo < mean < hi
    assert 0.6 <= lo and hi <= 0.9
    assert bootstrap_mean_ci(values, n_resamples=2000, seed=3) == (lo, hi)  # seeded
    wide = bootstrap_mean_ci(values, n_resamples=2000, confidence=0.99, seed=3)
    assert wide[0] < lo and wide[1] > hi


@pytest.mark.parametrize("values", [[], [0.5], [np.nan, 0.5]])
def test_bootstrap_needs_two_values(values):
    assert all(np.isnan(bootstrap_mean_ci(values)))


def test_bootstrap_constant_values_and_disabled():
    assert bootstrap_mean_ci([0.8, 0.8, 0.8]) == (0.8, 0.8)
    assert all(np.isnan(bootstrap_mean_ci([0.1, 0.5, 0.9], n_resamples=0)))


def test_ratio_bootstrap_drops_zero_denominators():
    lo, hi = bootstrap_ratio_ci([1, 2, 0, 3], [2, 2, 0, 4], n_resamples=500)
    assert 0.5 <= lo <= 6 / 8 <= hi <= 1.0
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1, 2], [1, 2, 3])


def test_describe():
    d = describe([0.2, np.nan, 0.4, 0.9], n_resamples=500)
    assert d["n"] == 3 and d["n_undefined"] == 1
    assert d["mean"] == pytest.approx(0.5)
    assert d["median"] == pytest.approx(0.4)
    assert d["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert d["ci_low"] < d["mean"] < d["ci_high"]
    empty = describe([np.nan, np.nan])
    assert empty["n"] == 0 and np.isnan(empty["mean"])


# ----------------------------------------------------------------------------------------------
# paired tests
# ----------------------------------------------------------------------------------------------
def _paired(rng, n, effect, noise=0.04):
    base = np.clip(dice_like(rng, n), 0, 1)
    return base, base + effect + rng.normal(0.0, noise, size=n)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_planted_improvement_is_detected(higher_is_better):
    rng = np.random.default_rng(0)
    effect = 0.03 if higher_is_better else -0.03  # better = larger Dice / smaller distance
    base, cand = _paired(rng, 30, effect)
    res = paired_comparison(base, cand, higher_is_better=higher_is_better, n_resamples=1000)
    assert res["ttest_p"] < 0.05
    assert res["wilcoxon_p"] < 0.05
    assert res["n_improved"] > res["n_worse"]
    assert res["alternative"] == ("greater" if higher_is_better else "less")
    assert res["mean_difference"] == pytest.approx(np.mean(cand - base))
    assert res["ci_low"] <= res["mean_difference"] <= res["ci_high"]
    reverse = paired_comparison(cand, base, higher_is_better=higher_is_better, n_resamples=0)
    assert reverse["ttest_p"] > 0.95 and reverse["wilcoxon_p"] > 0.95  # one-tailed: a worse run is no gain


def test_null_effect_is_not_detected():
    rng = np.random.default_rng(1)
    base, cand = _paired(rng, 30, 0.0)
    res = paired_comparison(base, cand, n_resamples=1000)
    assert res["ttest_p"] > 0.05
    assert res["wilcoxon_p"] > 0.05
    assert res["ci_low"] < 0 < res["ci_high"]


def test_false_positive_rate_under_null():
    rng = np.random.default_rng(2)
    hits_t = hits_w = 0
    reps = 300
    for _ in range(reps):
        base, cand = _paired(rng, 20, 0.0)
        res = paired_comparison(base, cand, n_resamples=0)
        hits_t += res["ttest_p"] < 0.05
        hits_w += res["wilcoxon_p"] < 0.05
    assert 0.015 <= hits_t / reps <= 0.10
    assert 0.015 <= hits_w / reps <= 0.10


def test_counts_ties_and_missing_pairs():
    base = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, np.nan, 0.5])
    diff = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, -0.05, 0.2, 0.0])
    cand = base + diff
    cand[-2] = 0.7  # baseline undefined: dropped
    res = paired_comparison(base, cand, n_resamples=0)
    assert (res["n"], res["n_improved"], res["n_worse"], res["n_tied"]) == (9, 7, 1, 1)
    dist = paired_comparison(base, cand, higher_is_better=False, n_resamples=0)
    assert (dist["n_improved"], dist["n_worse"]) == (1, 7)


def test_degenerate_pairs():
    same = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], n_resamples=0)
    assert np.isnan(same["ttest_p"]) and np.isnan(same["wilcoxon_p"]) and same["n_tied"] == 3
    one = paired_comparison([0.5], [0.9], n_resamples=100)
    assert one["n"] == 1 and np.isnan(one["ttest_p"]) and one["n_improved"] == 1
    with pytest.raises(ValueError):
        paired_comparison([0.1, 0.2], [0.1])

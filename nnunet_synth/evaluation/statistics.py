"""Bootstrap confidence intervals and paired tests between runs (scipy.stats underneath).

* Confidence intervals are non-parametric percentile bootstrap intervals obtained by resampling
  *cases* with replacement (``scipy.stats.bootstrap``, seeded numpy Generator). Undefined (NaN)
  values are left out before resampling. Quantities pooled over several items per case (per-slice
  Dice, lesion recall) are bootstrapped as ratios of per-case sums, so the case stays the unit of
  resampling (a cluster bootstrap).
* Paired tests compare a candidate run with a baseline on the cases where both values are defined:
  a one-tailed paired t-test (``scipy.stats.ttest_rel``, as in the liver-MRI paper) and a one-tailed
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped), both with the
  alternative "the candidate is better" (larger Dice, smaller distance).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

#: absolute difference below which a paired case counts as tied
TIE_TOLERANCE = 1e-9


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, resampling values (cases).

    Args:
        values: one value per case; NaN and inf are left out.
        n_resamples: bootstrap resamples; 0 disables the interval.
        confidence: confidence level, e.g. 0.95.
        seed: seed of the numpy Generator.

    Returns:
        ``(low, high)``; ``(nan, nan)`` with fewer than two values or ``n_resamples == 0``.
    """
    data = _finite(values)
    if n_resamples <= 0 or data.size < 2:
        return float("nan"), float("nan")
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    res = stats.bootstrap(
        (data,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        vectorized=True, rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _ratio(numerators: np.ndarray, denominators: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(numerators, axis=axis) / np.sum(denominators, axis=axis)


def bootstrap_ratio_ci(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Cluster bootstrap interval of a pooled ratio ``sum(numerators) / sum(denominators)``.

    Each case contributes one numerator and one denominator (e.g. detected lesions and reference
    lesions, or the sum and count of its per-slice Dice values); cases are resampled together.
    Cases with a zero denominator contribute nothing to the ratio and are left out.

    Args:
        numerators: per-case numerators.
        denominators: per-case denominators (>= 0).
        n_resamples: bootstrap resamples; 0 disables the interval.
        confidence: confidence level.
        seed: seed of the numpy Generator.

    Returns:
        ``(low, high)``; ``(nan, nan)`` with fewer than two contributing cases.
    """
    num = np.asarray(numerators, dtype=np.float64).ravel()
    den = np.asarray(denominators, dtype=np.float64).ravel()
    if num.shape != den.shape:
        raise ValueError(f"numerators {num.shape} and denominators {den.shape} differ in length")
    keep = (den > 0) & np.isfinite(num)
    num, den = num[keep], den[keep]
    if n_resamples <= 0 or num.size < 2:
        return float("nan"), float("nan")
    per_case = num / den
    if np.ptp(per_case) == 0:
        return float(per_case[0]), float(per_case[0])
    res = stats.bootstrap(
        (num, den), _ratio, paired=True, n_resamples=n_resamples, confidence_level=confidence,
        method="percentile", vectorized=True, rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def describe(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """Mean, median, standard deviation and bootstrap CI of per-case values.

    Args:
        values: one value per case; NaN marks an undefined value and is left out.
        n_resamples: bootstrap resamples (0: no interval).
        confidence: confidence level.
        seed: seed of the numpy Generator.

    Returns:
        dict with ``mean``, ``median``, ``std`` (ddof 1), ``ci_low``, ``ci_high``, ``n`` (defined values)
        and ``n_undefined``.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    data = arr[np.isfinite(arr)]
    low, high = bootstrap_mean_ci(data, n_resamples, confidence, seed)
    return {
        "mean": float(data.mean()) if data.size else float("nan"),
        "median": float(np.median(data)) if data.size else float("nan"),
        "std": float(data.std(ddof=1)) if data.size > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "n": int(data.size),
        "n_undefined": int(arr.size - data.size),
    }


def paired_comparison(
    baseline: Sequence[float] | np.ndarray,
    candidate: Sequence[float] | np.ndarray,
    higher_is_better: bool = True,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Paired comparison of a candidate run against a baseline, case by case.

    Args:
        baseline: per-case values of the baseline run.
        candidate: per-case values of the candidate run, in the same case order.
        higher_is_better: True for Dice-like metrics, False for distances; sets the one-tailed
            alternative ("candidate better") and which differences count as improved.
        n_resamples: bootstrap resamples for the interval of the mean difference.
        confidence: confidence level.
        seed: seed of the numpy Generator.

    Returns:
        dict with ``n`` (cases where both are defined), ``mean_difference`` and
        ``median_difference`` (candidate minus baseline), ``ci_low``/``ci_high`` of the mean
        difference, ``ttest_p`` and ``wilcoxon_p`` (one-tailed; NaN with fewer than two pairs or when
        every difference is zero; a constant non-zero difference gives a t-test p of 0 or 1),
        ``alternative`` (``"greater"`` or ``"less"``), and the counts ``n_improved``, ``n_worse``,
        ``n_tied`` (ties: ``|difference| <= TIE_TOLERANCE``).
    """
    a = np.asarray(baseline, dtype=np.float64).ravel()
    b = np.asarray(candidate, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"baseline ({a.size} cases) and candidate ({b.size} cases) are not paired")
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    diff = b - a
    gain = diff if higher_is_better else -diff
    alternative = "greater" if higher_is_better else "less"
    out: dict[str, float | int | str] = {
        "n": int(diff.size),
        "mean_difference": float(diff.mean()) if diff.size else float("nan"),
        "median_difference": float(np.median(diff)) if diff.size else float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "ttest_p": float("nan"),
        "wilcoxon_p": float("nan"),
        "alternative": alternative,
        "n_improved": int(np.count_nonzero(gain > TIE_TOLERANCE)),
        "n_worse": int(np.count_nonzero(gain < -TIE_TOLERANCE)),
        "n_tied": int(np.count_nonzero(np.abs(diff) <= TIE_TOLERANCE)),
    }
    out["ci_low"], out["ci_high"] = bootstrap_mean_ci(diff, n_resamples, confidence, seed)
    if diff.size < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if np.any(diff != 0):
            out["ttest_p"] = float(stats.ttest_rel(b, a, alternative=alternative).pvalue)
        if np.any(np.abs(diff) > TIE_TOLERANCE):
            out["wilcoxon_p"] = float(stats.wilcoxon(b, a, alternative=alternative, zero_method="wilcox").pvalue)
    return out

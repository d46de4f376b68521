"""Intervals for accuracies and ratios: Wilson for one proportion, percentile bootstrap for the rest."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved at 0 and 1, unlike the normal one)."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, n={n}]")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; float rounding would leave 1 - 1e-16.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_distribution(
    samples: Sequence[np.ndarray] | np.ndarray,
    statistic: Callable[..., float] = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    paired: bool = True,
) -> np.ndarray:
    """The statistic over ``n_resamples`` bootstrap resamples (``scipy.stats.bootstrap`` draws them).
    ``samples`` is one array, or several arrays passed to ``statistic`` as separate arguments: resampled
    together (``paired``: the same items, e.g. one question under three models) or each on its own
    (independent groups)."""
    from scipy.stats import bootstrap

    arrays = [np.asarray(samples)] if isinstance(samples, np.ndarray) else [np.asarray(a) for a in samples]
    if any(len(a) == 0 for a in arrays) or (paired and any(len(a) != len(arrays[0]) for a in arrays)):
        raise ValueError("samples must be non-empty" + (" and aligned" if paired else ""))
    with warnings.catch_warnings():  # a constant sample is a valid (degenerate) interval, not a problem to report
        warnings.simplefilter("ignore")
        result = bootstrap(
            arrays,
            statistic,
            n_resamples=n_resamples,
            paired=paired and len(arrays) > 1,
            vectorized=False,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return np.asarray(result.bootstrap_distribution, dtype=float)


def bootstrap_interval(
    samples: Sequence[np.ndarray] | np.ndarray,
    statistic: Callable[..., float] = np.mean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = True,
) -> tuple[float, float]:
    """Percentile bootstrap interval over items (see ``bootstrap_distribution``). Resamples whose statistic
    is not finite (a 0/0 ratio) are dropped before taking the percentiles: scipy's own interval would be
    NaN as soon as one resample is, which a ratio of two small accuracy differences often has."""
    stats = bootstrap_distribution(samples, statistic, n_resamples, seed, paired)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def recovery_table(per_question, n_resamples: int = 2000, seed: int = 0, models=("base", "rank1", "full")):
    """Per protocol and benchmark: paired differences and what the LoRA recovers, with bootstrap intervals.

    ``per_question``: columns protocol, benchmark, model, id, correct (a question's accuracy: 0/1 greedy,
    or its mean over samples). Questions are resampled jointly for all models (paired).
    ``gain_recovered`` = (lora - base) / (full - base); ``ratio_to_full`` = lora / full.
    """
    import pandas as pd

    base, lora, full = models
    rows = []
    for (protocol, bench), group in per_question.groupby(["protocol", "benchmark"]):
        wide = group.pivot_table(index="id", columns="model", values="correct")
        if not {base, lora, full} <= set(wide.columns):
            continue
        wide = wide.dropna(subset=[base, lora, full])
        b, r, f = (wide[m].to_numpy(dtype=float) for m in (base, lora, full))
        stats = {
            "gain_recovered": lambda b, r, f: (r.mean() - b.mean()) / (f.mean() - b.mean()) if f.mean() != b.mean() else np.nan,
            "ratio_to_full": lambda b, r, f: r.mean() / f.mean() if f.mean() > 0 else np.nan,
            f"{lora}_minus_{base}": lambda b, r, f: r.mean() - b.mean(),
            f"{full}_minus_{base}": lambda b, r, f: f.mean() - b.mean(),
            f"{lora}_minus_{full}": lambda b, r, f: r.mean() - f.mean(),
        }
        row = {"protocol": protocol, "benchmark": bench, "n": len(wide)}
        for name, fn in stats.items():
            row[name] = float(fn(b, r, f))
            row[f"{name}_lo"], row[f"{name}_hi"] = bootstrap_interval([b, r, f], fn, n_resamples, seed=seed)
        rows.append(row)
    return pd.DataFrame(rows)

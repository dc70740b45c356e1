"""The Findings table every notebook ends with.

Columns: claim | paper's evidence | this run | verdict | profile | n | uncertainty. A verdict is
decided from an interval, not a point: `interval_verdict` says `reproduced` only when the whole
interval is on the claimed side of the rule's threshold, `not reproduced` when it is wholly on the
other side, and `inconclusive` when it straddles the threshold.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

COLUMNS = ["claim", "paper", "this_run", "verdict", "profile", "n", "uncertainty"]
REQUIRED = ["claim", "paper", "this_run", "verdict"]
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "inconclusive", "not tested", "n/a")
NOT_ESTIMATED = "none (point estimate)"


def findings_table(rows: list[dict], figures_dir: str | Path | None = None, profile: str | None = None) -> pd.DataFrame:
    """Validate the rows, fill `profile`, and write `<figures_dir>/findings.csv` when a directory is given.

    A row may omit `n` (the seeds, images or panels behind its verdict) and `uncertainty` (the
    interval or test, as text); they are then reported as blank and as a point estimate.
    """
    if not rows:
        raise ValueError("findings_table needs at least one row")
    for row in rows:
        missing = set(REQUIRED) - set(row)
        if missing:
            raise ValueError(f"finding {row.get('claim', row)!r} lacks {sorted(missing)}; columns are {COLUMNS}")
        if row["verdict"] not in VERDICTS:
            raise ValueError(f"verdict {row['verdict']!r} is not one of {VERDICTS}")
    filled = [{"profile": profile or "", "n": "", "uncertainty": NOT_ESTIMATED, **row} for row in rows]
    table = pd.DataFrame(filled)[COLUMNS]
    if profile is not None:
        table["profile"] = profile
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(figures_dir) / "findings.csv", index=False)
    return table


def verdict(passed: bool, partly: bool = False) -> str:
    return "reproduced" if passed else ("partly reproduced" if partly else "not reproduced")


def interval_verdict(low: float, high: float, threshold: float, *, above: bool = True) -> str:
    """`reproduced` when [low, high] lies wholly on the claimed side of `threshold` (above it when
    `above`, below it otherwise), `not reproduced` when wholly on the other side, else `inconclusive`."""
    if any(not isinstance(v, (int, float, np.floating, np.integer)) or math.isnan(v) for v in (low, high, threshold)):
        raise ValueError(f"interval_verdict needs finite numbers; got low={low}, high={high}, threshold={threshold}")
    if low > high:
        raise ValueError(f"interval is empty: low={low} > high={high}")
    if not above:
        low, high, threshold = -high, -low, -threshold
    if low > threshold:
        return "reproduced"
    if high <= threshold:
        return "not reproduced"
    return "inconclusive"


def mean_interval(values, level: float = 0.95, method: str = "t", seed: int = 0) -> tuple[float, float, float]:
    """Mean of `values` (one per unit: seed, image, panel) and its `level` confidence interval.

    `method="t"`: Student's t interval (`scipy.stats.ttest_1samp`), right for a few seeds;
    `method="bootstrap"`: BCa bootstrap over units (`bootstrap_units`), for many images.
    With a single unit the interval is the point itself (there is nothing to resample); callers
    must report n so that a reader sees it. NaN values are dropped (an undefined score is missing,
    not zero).
    """
    x = np.asarray(values, dtype=float).ravel()
    if np.isinf(x).any():
        raise ValueError("mean_interval got an infinite value; drop or fix it first")
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise ValueError("mean_interval needs at least one non-NaN value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
    if method == "t":
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=level)
    elif method == "bootstrap":
        return mean, *bootstrap_units(lambda i: x[i].mean(axis=-1), x.size, method="BCa", level=level, seed=seed,
                                      vectorized=True)[1:]
    else:
        raise ValueError(f"unknown method {method!r}; choose 't' or 'bootstrap'")
    return mean, float(ci.low), float(ci.high)


BOOTSTRAP_METHODS = ("percentile", "basic", "BCa")


def bootstrap_units(statistic, n_units: int, *, method: str = "percentile", level: float = 0.95,
                    n_resamples: int = 2000, seed: int = 0, vectorized: bool = False):
    """`statistic(unit indices)` on all `n_units` units and its `level` bootstrap interval over units.

    `scipy.stats.bootstrap` resamples the indices 0 … n_units − 1, so one draw takes all of a unit's
    data: paired samples, an image with all its scores, a model with all its checkpoints (the same
    draws as scipy's `paired=True`). The statistic returns a float or a 1-D array; `vectorized`: it
    takes (…, n) index arrays and reduces the last axis (faster than one call per resample).
    `method`: "percentile"; "basic" (2·estimate − quantiles, for a minimum, whose percentile interval
    the noise of the many values it picks from shifts down); "BCa", or the percentile interval where
    BCa is undefined (a nearly degenerate resampling distribution). Returns (estimate, low, high),
    floats for a scalar statistic and arrays for a vector one; NaN where the statistic is NaN on
    resamples. Callers decide what one unit, or units that all agree, mean (nothing to resample).
    """
    if isinstance(n_units, bool) or not isinstance(n_units, (int, np.integer)) or n_units < 2:
        raise ValueError(f"bootstrap_units needs an integer number of units >= 2; got n_units={n_units!r}")
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"method must be one of {BOOTSTRAP_METHODS}, got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    index = np.arange(int(n_units))
    estimate = np.asarray(statistic(index), dtype=np.float64)

    def resampled(i, axis=-1):  # vectorized: scipy passes axis=-1, the axis the statistic reduces
        return np.asarray(statistic(i), dtype=np.float64)

    def interval(how):
        ci = stats.bootstrap((index,), resampled, vectorized=vectorized, n_resamples=n_resamples,
                             confidence_level=level, method=how, random_state=np.random.default_rng(seed))
        low, high = np.asarray(ci.confidence_interval.low), np.asarray(ci.confidence_interval.high)
        if estimate.ndim == 0:
            return float(estimate), float(low), float(high)
        return estimate, low, high

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        if method == "BCa":
            warnings.simplefilter("error", stats.DegenerateDataWarning)
            try:
                return interval("BCa")
            except stats.DegenerateDataWarning:  # BCa undefined: the percentile interval
                method = "percentile"
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # NaN resamples: a NaN interval (documented)
        return interval(method)


def correlation_interval(r: float, n: int, level: float = 0.95, *, spearman: bool = False) -> tuple[float, float]:
    """Fisher-z `level` interval of a correlation r over n units: tanh(atanh(r) ± z·SE), with
    SE = 1/√(n − 3) for Pearson (as `scipy.stats.pearsonr(...).confidence_interval`) and
    √(1.06/(n − 3)) for Spearman's ρ (Fieller, Hartley & Pearson 1957; scipy has none, and Pearson's
    SE on the ranks is about 3% too narrow). (NaN, NaN) where r is NaN or n < 4; (r, r) where |r| = 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be an integer number of units; got {n!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not (math.isnan(r) or abs(r) <= 1 + 1e-9):  # rounding may put a perfect correlation a hair past 1
        raise ValueError(f"a correlation lies in [-1, 1]; got {r!r}")
    if math.isnan(r) or n < 4:
        return math.nan, math.nan
    if abs(r) >= 1:  # a perfect correlation: the interval is the point, as scipy's
        return float(np.sign(r)), float(np.sign(r))
    z = math.atanh(r)
    half = stats.norm.ppf((1 + level) / 2) * math.sqrt((1.06 if spearman else 1.0) / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def describe_interval(mean: float, low: float, high: float, n: int, unit: str = "seeds", digits: int = 2,
                      method: str = "t") -> str:
    """The `uncertainty` text: '0.61 [0.52, 0.70], 95% t CI over 5 seeds'."""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}], 95% {method} CI over {n} {unit}"


def check_summary(table: pd.DataFrame) -> str:
    """What a checked notebook cell may print on any machine: the claims and that each carries a valid
    verdict, never the verdicts themselves (an interval edge can move with floating-point summation)."""
    lines = [f"{len(table)} claims, every verdict one of the allowed: {bool(table['verdict'].isin(VERDICTS).all())}"]
    lines += [f"- {claim}" for claim in table["claim"]]
    return "\n".join(lines)

"""Reliability statistics for saliency metrics (Tomsett et al. 2020; Vandersmissen & Oramas 2024).

Scores are arranged as an ``(n_images, n_methods)`` matrix: one metric's score of every saliency
method on every image.

* Inter-rater reliability: Krippendorff's α with each image a rater, each method a unit and the
  method's rank within the image as the value (:func:`krippendorff_alpha`, computed by the
  ``krippendorff`` package).
* Inter-method reliability: Spearman ρ across images between every pair of methods
  (:func:`inter_method_reliability`).
* Internal consistency: Spearman ρ across images between every pair of sign-aligned metrics
  (:func:`internal_consistency`).
* Metric-vs-metric correlations with the correlation chosen by score type, Spearman /
  point-biserial / Pearson (phi) (:func:`metric_correlation_matrix`, Vandersmissen & Oramas).

Sign alignment: a metric flagged lower-is-better is negated (continuous) or flipped to 1 − x
(binary) before it is ranked or correlated (Tomsett Q7), so "higher = better" holds everywhere.
Every correlation is computed per pair explicitly (Tomsett Q6). A constant score vector has no
defined correlation: that raises ``ValueError`` naming the column, never a silent NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import krippendorff
import numpy as np
import pandas as pd
import torch
from scipy import stats

__all__ = [
    "rank_within_images",
    "krippendorff_alpha",
    "JackknifeCI",
    "jackknife_ci",
    "jackknife_interval",
    "off_diagonal_summary",
    "inter_method_reliability",
    "internal_consistency",
    "point_biserial",
    "binary_pearson",
    "is_binary",
    "metric_correlation_matrix",
    "KRIPPENDORFF_RELIABLE",
    "KRIPPENDORFF_TENTATIVE",
]

#: Krippendorff (2004): α ≥ 0.8 reliable, α ≥ 0.667 tentative conclusions.
KRIPPENDORFF_RELIABLE = 0.8
KRIPPENDORFF_TENTATIVE = 0.667

_LEVELS = ("ordinal", "interval", "ratio", "nominal")
_RANKINGS = ("rank", "argsort", "none")


def _array(x, name: str, allow_nan: bool = False) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif isinstance(x, (pd.DataFrame, pd.Series)):
        x = x.to_numpy()
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.float64)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}")
    a = a.astype(np.float64)
    if allow_nan:
        if np.isinf(a).any():
            raise ValueError(f"{name} contains Inf ({int(np.isinf(a).sum())} values); scores must be finite or NaN")
        return a
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf ({int((~np.isfinite(a)).sum())} values); scores must be finite")
    return a


def _matrix(scores, name: str = "scores", min_images: int = 2, allow_nan: bool = False) -> np.ndarray:
    a = _array(scores, name, allow_nan)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_images, n_methods) matrix; got shape {a.shape}")
    if a.shape[0] < min_images or a.shape[1] < 2:
        raise ValueError(f"{name} needs at least {min_images} images and 2 methods; got shape {a.shape}")
    return a


def _vector(x, name: str) -> np.ndarray:
    a = _array(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per image); got shape {a.shape}")
    if a.shape[0] < 3:
        raise ValueError(f"{name} needs at least 3 images for a correlation; got {a.shape[0]}")
    return a


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def rank_within_images(scores, higher_is_better: bool = True, missing: str = "raise") -> np.ndarray:
    """Rank the methods within each image (row), ties averaged (``scipy.stats.rankdata``).

    Ranks run from 1 (worst) to n_methods (best) after sign alignment, so for scores
    [0.3, 0.1, 0.2] the ranks are [3, 1, 2] — not the argsort [1, 2, 0] (Tomsett Q5).
    ``higher_is_better=False`` ranks the negated scores, which reverses every ranking.
    Krippendorff's α is invariant to reversing all rankings, so the direction only matters for
    reading the ranks. ``missing="omit"`` ranks each image's defined scores and keeps NaN where a
    score is missing; ``"raise"`` (default) rejects NaN.
    """
    if missing not in ("raise", "omit"):
        raise ValueError(f"missing must be 'raise' or 'omit'; got {missing!r}")
    a = _matrix(scores, min_images=1, allow_nan=missing == "omit")
    aligned = a if _check_bool(higher_is_better, "higher_is_better") else -a
    return stats.rankdata(aligned, method="average", axis=1, nan_policy="omit" if missing == "omit" else "propagate")


def krippendorff_alpha(
    scores, level: str = "ordinal", higher_is_better: bool = True, ranking: str = "rank", missing: str = "raise"
) -> float:
    """Krippendorff's α of an ``(n_images, n_methods)`` score matrix (Tomsett et al. 2020, E3).

    Raters = images (rows), units = methods (columns), values = the method's within-image rank
    (:func:`rank_within_images`, ties averaged). α = 1 − D_o / D_e is computed by the
    ``krippendorff`` package with ``level`` "ordinal" (default), "interval", "ratio" or "nominal".

    ``ranking`` chooses the values:

    * ``"rank"`` (default): proper ranks, the reproduction's primary choice;
    * ``"argsort"``: ``np.argsort`` of each row (stable), i.e. the sort *order*, as in Vandersmissen
      & Oramas' code (their Q2 — pair it with ``level="interval"``, the package default they used);
    * ``"none"``: the sign-aligned raw scores (the interval α on the score matrix of some
      third-party code).

    ``missing="raise"`` (default) rejects NaN scores; ``missing="omit"`` treats a NaN score (an
    undefined metric value) as a missing value: the methods are ranked among the defined scores of
    each image (``rankdata(nan_policy="omit")``), an image with fewer than two defined scores is
    dropped, and the package's α for missing data is computed on the rest.

    Identical rankings on every image give α = 1; independent random rankings give α ≈ 0. If all
    values are equal (every image ties every method) α is undefined and ``ValueError`` is raised.
    """
    if missing not in ("raise", "omit"):
        raise ValueError(f"missing must be 'raise' or 'omit'; got {missing!r}")
    a = _matrix(scores, allow_nan=missing == "omit")
    if missing == "omit":
        a = a[(~np.isnan(a)).sum(axis=1) >= 2]
        if a.shape[0] < 2:
            raise ValueError("Krippendorff's alpha needs at least 2 images with 2 or more defined scores")
    if level not in _LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {list(_LEVELS)}")
    if ranking not in _RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {list(_RANKINGS)}")
    aligned = a if _check_bool(higher_is_better, "higher_is_better") else -a
    if ranking == "rank":
        values = rank_within_images(a, higher_is_better, missing="omit")
    elif ranking == "argsort":
        if np.isnan(aligned).any():
            raise ValueError("ranking='argsort' cannot handle missing (NaN) scores; use ranking='rank'")
        values = np.argsort(aligned, axis=1, kind="stable").astype(np.float64)
    else:
        values = aligned
    if np.unique(values[~np.isnan(values)]).size < 2:
        raise ValueError(
            "Krippendorff's alpha is undefined: every value is the same (e.g. all methods tie on every image)"
        )
    alpha = float(krippendorff.alpha(reliability_data=values, level_of_measurement=level))
    if not np.isfinite(alpha):
        raise ValueError("Krippendorff's alpha is undefined for these scores (no expected disagreement)")
    return alpha


class JackknifeCI(NamedTuple):
    """A statistic on the full data and its leave-one-out jackknife t interval over ``n`` units."""

    estimate: float
    low: float
    high: float
    n: int


def jackknife_ci(statistic: Callable, data, level: float = 0.95) -> JackknifeCI:
    """Leave-one-image-out jackknife confidence interval of ``statistic(data) -> float``.

    ``data`` is an array, tensor or DataFrame with images (the independent units) along its first
    axis. The statistic is computed on the full data (θ) and with each image left out in turn
    (θ₋ᵢ); the pseudo-values n·θ − (n − 1)·θ₋ᵢ are treated as n independent values and their
    Student t interval (``scipy.stats.ttest_1samp(...).confidence_interval``) is returned, centred
    on the bias-corrected jackknife estimate. Unlike a bootstrap it never duplicates an image, so
    a statistic that rewards agreement between units (Krippendorff's α with images as raters) is
    not inflated. ``estimate`` is θ on the full data. A statistic that is not finite on some
    leave-one-out sample raises ``ValueError``.
    """
    if not callable(statistic):
        raise ValueError("statistic must be a callable taking the data with one image left out")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    if isinstance(data, pd.DataFrame):
        rows = len(data)

        def take(index):
            return data.iloc[index].reset_index(drop=True)

    else:
        array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if array.ndim < 1:
            raise ValueError("data must have images along its first axis")
        rows = array.shape[0]

        def take(index):
            return array[index]

    if rows < 3:
        raise ValueError(f"data needs at least 3 images (rows) for a jackknife interval; got {rows}")

    def evaluate(sample) -> float:
        value = float(statistic(sample))
        if not np.isfinite(value):
            raise ValueError(f"statistic returned {value} on a leave-one-out sample; it must be finite")
        return value

    everything = np.arange(rows)
    estimate = evaluate(take(everything))
    leave_out = np.array([evaluate(take(np.delete(everything, i))) for i in range(rows)])
    return jackknife_interval(estimate, leave_out, level)


def jackknife_interval(estimate: float, leave_out, level: float = 0.95) -> JackknifeCI:
    """The interval of :func:`jackknife_ci` from θ on all n images and the n leave-one-out values
    θ₋ᵢ, for a statistic that computes all θ₋ᵢ at once faster than one by one. Every value must be
    finite and n ≥ 3 (``ValueError`` otherwise)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    leave_out = np.asarray(leave_out, dtype=float)
    if leave_out.ndim != 1:
        raise ValueError(f"leave_out must hold one value per image (1-D); got shape {leave_out.shape}")
    rows = leave_out.size
    if rows < 3:
        raise ValueError(f"data needs at least 3 images (rows) for a jackknife interval; got {rows}")
    estimate = float(estimate)
    if not (np.isfinite(estimate) and np.isfinite(leave_out).all()):
        raise ValueError("the statistic must be finite on the data and on every leave-one-out sample")
    pseudo = rows * estimate - (rows - 1) * leave_out
    if np.ptp(pseudo) == 0:
        return JackknifeCI(estimate, float(pseudo[0]), float(pseudo[0]), rows)
    ci = stats.ttest_1samp(pseudo, 0.0).confidence_interval(confidence_level=level)
    return JackknifeCI(estimate, float(ci.low), float(ci.high), rows)


def _names(names: Sequence[str] | None, count: int, what: str) -> list[str]:
    if names is None:
        return [f"{what}{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"{len(names)} {what} names given for {count} columns")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique; got {names}")
    return names


def _spearman(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> float:
    for values, name in ((x, x_name), (y, y_name)):
        if np.ptp(values) == 0:
            raise ValueError(f"{name!r} is constant across images; its correlation is undefined")
    return float(stats.spearmanr(x, y).statistic)


def off_diagonal_summary(matrix: pd.DataFrame) -> dict[str, float]:
    """Mean, minimum and maximum of the off-diagonal entries of a square correlation matrix.

    Each unordered pair is counted once (upper triangle); the unit diagonal is excluded.
    ``n_pairs`` counts every pair. NaN entries (undefined correlations, e.g. what
    ``DataFrame.corr`` gives for a constant column) are left out of mean/min/max and counted in
    ``n_undefined``; a matrix with no defined pair, or with an infinite entry, raises ``ValueError``.
    """
    try:
        values = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"matrix must hold numbers: {error}") from None
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] < 2:
        raise ValueError(f"matrix must be square with at least 2 rows; got shape {values.shape}")
    upper = values[np.triu_indices(values.shape[0], k=1)]
    undefined = np.isnan(upper)
    if np.isinf(upper).any():
        raise ValueError("matrix has infinite off-diagonal entries")
    if undefined.all():
        raise ValueError(f"matrix has no defined off-diagonal entry (all {upper.size} are NaN)")
    defined = upper[~undefined]
    return {"mean": float(defined.mean()), "min": float(defined.min()), "max": float(defined.max()),
            "n_pairs": int(upper.size), "n_undefined": int(undefined.sum())}


def inter_method_reliability(scores, method_names: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Spearman ρ across images between every pair of methods, for one metric (Tomsett E3).

    ``scores`` is ``(n_images, n_methods)``. Returns the symmetric ρ matrix (a DataFrame indexed by
    method name, unit diagonal) and :func:`off_diagonal_summary` of it. ρ is computed per pair
    (Tomsett Q6), never from one 2-D call that mixes in the diagonal. A method whose score is
    constant across images raises ``ValueError``. Sign alignment is irrelevant here: negating the
    metric negates both columns of every pair.
    """
    a = _matrix(scores)
    names = _names(method_names, a.shape[1], "method")
    matrix = _pairwise(
        [a[:, j] for j in range(a.shape[1])], names, lambda x, y, i, j: _spearman(x, y, names[i], names[j])
    )
    return matrix, off_diagonal_summary(matrix)


def _pairwise(columns: list[np.ndarray], names: list[str], correlate) -> pd.DataFrame:
    k = len(columns)
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = correlate(columns[i], columns[j], i, j)
    return pd.DataFrame(out, index=names, columns=names)


def _by_metric(scores_by_metric: Mapping, higher_is_better: Mapping | None) -> tuple[list[str], list[np.ndarray], dict]:
    if not isinstance(scores_by_metric, Mapping) or len(scores_by_metric) < 2:
        raise ValueError("scores_by_metric must be a dict of at least 2 metrics: name -> (n_images,) scores")
    names = [str(n) for n in scores_by_metric]
    columns = [_vector(v, f"scores_by_metric[{n!r}]") for n, v in scores_by_metric.items()]
    lengths = {c.shape[0] for c in columns}
    if len(lengths) != 1:
        raise ValueError(
            "every metric needs one score per image, the same images; got lengths "
            + str({n: c.shape[0] for n, c in zip(names, columns)})
        )
    if higher_is_better is None:
        directions = {n: True for n in names}
    else:
        if not isinstance(higher_is_better, Mapping):
            raise ValueError("higher_is_better must be a dict: metric name -> bool")
        unknown = sorted(set(map(str, higher_is_better)) - set(names))
        missing = sorted(set(names) - set(map(str, higher_is_better)))
        if unknown:
            raise ValueError(f"higher_is_better names unknown metrics {unknown}; metrics are {names}")
        if missing:
            raise ValueError(f"higher_is_better lacks a direction for metrics {missing}")
        directions = {str(n): _check_bool(v, f"higher_is_better[{n!r}]") for n, v in higher_is_better.items()}
    return names, columns, directions


def internal_consistency(scores_by_metric: Mapping, higher_is_better: Mapping | None = None) -> pd.DataFrame:
    """Spearman ρ across images between every pair of sign-aligned metrics, for one method.

    ``scores_by_metric`` maps metric name -> ``(n_images,)`` scores on the same images;
    ``higher_is_better`` maps every metric name -> bool (all True if omitted). Lower-is-better
    metrics are negated first (Tomsett Q7), so a negated copy of a metric flagged lower-is-better
    has ρ = +1 with the original. Returns the symmetric matrix with a unit diagonal; summarise it
    with :func:`off_diagonal_summary`.
    """
    names, columns, directions = _by_metric(scores_by_metric, higher_is_better)
    aligned = [c if directions[n] else -c for n, c in zip(names, columns)]
    return _pairwise(aligned, names, lambda x, y, i, j: _spearman(x, y, names[i], names[j]))


def is_binary(values) -> bool:
    """True when every value is 0 or 1 (e.g. a pointing-game hit)."""
    a = _array(values, "values")
    return bool(np.isin(a, (0.0, 1.0)).all())


def _binary(values, name: str) -> np.ndarray:
    a = _vector(values, name)
    if not np.isin(a, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be binary (0/1 or bool)")
    if np.ptp(a) == 0:
        raise ValueError(f"{name} is constant (all {int(a[0])}); its correlation is undefined")
    return a


def point_biserial(binary, continuous) -> float:
    """Point-biserial correlation of a 0/1 variable with a continuous one (``scipy.stats.pointbiserialr``).

    It equals Pearson's r with the binary variable coded 0/1 (Vandersmissen card §7 invariant 9).
    """
    b = _binary(binary, "binary")
    c = _vector(continuous, "continuous")
    if b.shape != c.shape:
        raise ValueError(f"binary and continuous must have the same length; got {b.shape[0]} and {c.shape[0]}")
    if np.ptp(c) == 0:
        raise ValueError("continuous is constant across images; its correlation is undefined")
    return float(stats.pointbiserialr(b.astype(bool), c).statistic)


def binary_pearson(a, b) -> float:
    """Pearson r of two 0/1 variables, i.e. the phi coefficient (Vandersmissen: binary vs binary)."""
    x = _binary(a, "a")
    y = _binary(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length; got {x.shape[0]} and {y.shape[0]}")
    return float(stats.pearsonr(x, y).statistic)


def metric_correlation_matrix(
    scores_by_metric: Mapping,
    higher_is_better: Mapping | None = None,
    binary: Sequence[str] | None = None,
    return_kinds: bool = False,
):
    """Correlation across images between every pair of metrics, chosen by score type (Vandersmissen E5).

    continuous–continuous: Spearman ρ; binary–continuous: point-biserial r; binary–binary: Pearson
    r (phi). A metric is binary when all its values are 0/1, unless ``binary`` names the binary
    metrics explicitly. Lower-is-better metrics are flipped first — to 1 − x as in the authors'
    code comment — which negates every correlation involving them. Returns the symmetric matrix
    with a unit diagonal; with ``return_kinds=True`` also a same-shaped DataFrame naming the
    correlation used per pair.
    """
    names, columns, directions = _by_metric(scores_by_metric, higher_is_better)
    if binary is None:
        flags = [bool(np.isin(c, (0.0, 1.0)).all()) for c in columns]
    else:
        binary = [str(b) for b in binary]
        unknown = sorted(set(binary) - set(names))
        if unknown:
            raise ValueError(f"binary names unknown metrics {unknown}; metrics are {names}")
        flags = [n in binary for n in names]
        for n, c, flag in zip(names, columns, flags):
            if flag and not np.isin(c, (0.0, 1.0)).all():
                raise ValueError(f"metric {n!r} is declared binary but has values other than 0/1")
    aligned = [c if directions[n] else 1.0 - c for n, c in zip(names, columns)]
    kinds = pd.DataFrame("", index=names, columns=names)

    def correlate(x, y, i, j):
        if flags[i] and flags[j]:
            kind, value = "pearson (phi)", _named(binary_pearson, x, y, names[i], names[j])
        elif flags[i]:
            kind, value = "point-biserial", _named(point_biserial, x, y, names[i], names[j])
        elif flags[j]:
            kind, value = "point-biserial", _named(point_biserial, y, x, names[j], names[i])
        else:
            kind, value = "spearman", _spearman(x, y, names[i], names[j])
        kinds.iloc[i, j] = kinds.iloc[j, i] = kind
        return value

    matrix = _pairwise(aligned, names, correlate)
    for i in range(len(names)):
        kinds.iloc[i, i] = "identity"
    return (matrix, kinds) if return_kinds else matrix


def _named(function, x, y, x_name: str, y_name: str) -> float:
    try:
        return function(x, y)
    except ValueError as error:
        raise ValueError(f"metrics {x_name!r} and {y_name!r}: {error}") from error

"""Complexity (sparsity) of saliency maps, one value per image.

* :func:`gini` — sparseness as the Gini index of |map| (Chalasani et al. 2020; Quantus
  ``Sparseness``). Higher = sparser.
* :func:`entropy` — complexity as the Shannon entropy of the normalised |map| (Bhatt et al.
  2020; Quantus ``Complexity``). Lower = more concentrated.
* :func:`sparsity_descriptors` — the value summaries Vandersmissen & Oramas 2024 (E4) use to
  describe how sparse a method's maps are.

Maps are ``(B, 1, H, W)`` or ``(B, H, W)``; NaN/Inf raise ``ValueError``. An all-zero map is
treated as the limit of a constant map: Gini 0 and entropy log(n) (Quantus reaches the same
values through its epsilons).
"""

from __future__ import annotations

import numpy as np

from study.metrics.localisation import _flat, _maps

__all__ = ["gini", "entropy", "sparsity_descriptors"]


def _check_eps(eps: float) -> float:
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    return float(eps)


def gini(maps, eps: float = 0.0) -> np.ndarray:
    """Gini index of the absolute map values (Chalasani et al. 2020), ``(B,)`` in [0, 1 − 1/n].

    With the n values |a| + eps sorted ascending as x_1 ≤ … ≤ x_n,

        G = Σ_i (2i − n − 1) x_i / (n Σ_i x_i).

    A one-hot map gives (n − 1)/n = 1 − 1/n, a constant map 0. ``eps=1e-7`` reproduces Quantus
    0.6.0 ``Sparseness`` bit for bit (it adds 1e-7 to every value); the default 0 is the exact
    index. An all-zero map (with eps 0) scores 0, the value of every constant map. Ties need no
    handling: G depends only on the sorted values.
    """
    a, _ = _maps(maps)
    eps = _check_eps(eps)
    x = np.sort(np.abs(_flat(a)) + eps, axis=1)
    n = x.shape[1]
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    total = x.sum(axis=1)
    return np.where(total > 0, (x @ weights) / (n * np.where(total > 0, total, 1.0)), 0.0)


def entropy(maps, eps: float = 0.0) -> np.ndarray:
    """Shannon entropy (natural log) of p = |a| / Σ|a| (Bhatt et al. 2020), ``(B,)`` in [0, log n].

    H = −Σ_i p_i log(p_i + eps), with 0·log 0 = 0 when eps is 0. A uniform map gives log n, a
    one-hot map 0. ``eps=1e-12`` reproduces Quantus 0.6.0 ``Complexity``. An all-zero map scores
    log n, the value of every constant map.
    """
    a, _ = _maps(maps)
    eps = _check_eps(eps)
    x = np.abs(_flat(a))
    n = x.shape[1]
    total = x.sum(axis=1, keepdims=True)
    p = np.where(total > 0, x / np.where(total > 0, total, 1.0), 1.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p + eps), 0.0)
    return -terms.sum(axis=1)


def sparsity_descriptors(maps, low: float = 0.05) -> dict[str, np.ndarray]:
    """Per-image value summaries (Vandersmissen & Oramas 2024, E4 / §5.4).

    Returns ``{"gini", "frac_below", "mean", "median", "q25", "q75"}``, each ``(B,)``;
    ``frac_below`` is the fraction of pixels with value < ``low`` (0.05 on maps in [0, 1]).
    """
    a, _ = _maps(maps)
    if not np.isfinite(low):
        raise ValueError(f"low must be a finite number; got {low!r}")
    x = _flat(a)
    q25, median, q75 = np.percentile(x, [25, 50, 75], axis=1)
    return {
        "gini": gini(a),
        "frac_below": (x < low).mean(axis=1),
        "mean": x.mean(axis=1),
        "median": median,
        "q25": q25,
        "q75": q75,
    }

"""Cross-checks against Quantus 0.6.0 on the same maps and masks.

Quantus metrics need a model and inputs even when explanations are given, so a tiny linear model
and random inputs are passed along with explicit ``a_batch`` (maps) and ``s_batch`` (masks);
``normalise=False`` everywhere so both sides see the same values.
"""

import study  # noqa: F401  (must precede quantus)

import numpy as np
import pytest
import torch

from study.metrics.complexity import entropy, gini
from study.metrics.localisation import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy

quantus = pytest.importorskip("quantus")

SEEDS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("one_thread")


def case(seed: int, signed: bool = False, quantised: bool = False):
    rng = np.random.default_rng(seed)
    b, h, w = 6, 8, 8
    x = rng.random((b, 1, h, w)).astype(np.float32)
    y = rng.integers(0, 3, size=b)
    a = rng.normal(size=(b, 1, h, w)) if signed else rng.random((b, 1, h, w))
    if quantised:
        a = np.round(a * 3) / 3  # many ties, including ties at the maximum
    s = (rng.random((b, 1, h, w)) < rng.uniform(0.1, 0.6)).astype(np.float64)
    s[:, 0, 0, 0] = 1.0  # never empty (Quantus returns NaN there, we raise)
    return x, y, a, s


def run_quantus(metric, x, y, a, s) -> np.ndarray:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].size, 3)).eval()
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a.copy(), s_batch=s.copy(), device="cpu")
    return np.asarray(scores, dtype=np.float64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("quantised", [False, True])
def test_pointing_game_matches_quantus(seed, quantised):
    x, y, a, s = case(seed, quantised=quantised)
    theirs = run_quantus(quantus.PointingGame(normalise=False, abs=False, disable_warnings=True), x, y, a, s)
    ours = pointing_game(a, s, ties="any")
    # tolerance: exact (boolean hits; Quantus also counts a hit when any maximal pixel is inside)
    np.testing.assert_array_equal(ours.astype(np.float64), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("signed", [False, True])
def test_relevance_mass_accuracy_matches_quantus(seed, signed):
    x, y, a, s = case(seed, signed=signed)
    theirs = run_quantus(quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True), x, y, a, s)
    # tolerance 1e-12: the same two sums in float64, possibly summed in a different order
    np.testing.assert_allclose(relevance_mass_accuracy(a, s), theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_relevance_rank_accuracy_matches_quantus(seed):
    x, y, a, s = case(seed)  # continuous maps: no ties, so Quantus' quicksort order is well defined
    theirs = run_quantus(quantus.RelevanceRankAccuracy(normalise=False, abs=False, disable_warnings=True), x, y, a, s)
    for ties in ("expected", "raster", "random"):
        # tolerance: exact (a ratio of the same two integer counts)
        np.testing.assert_array_equal(relevance_rank_accuracy(a, s, ties=ties), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("signed", [False, True])
def test_sparseness_matches_quantus(seed, signed):
    x, y, a, s = case(seed, signed=signed)
    theirs = run_quantus(quantus.Sparseness(normalise=False, abs=True, disable_warnings=True), x, y, a, s)
    # with Quantus' own epsilon (1e-7 added to every |a|) the formula is identical: tolerance 1e-12
    np.testing.assert_allclose(gini(a, eps=1e-7), theirs, rtol=0, atol=1e-12)
    # the exact Gini (eps 0) differs from Quantus only through that epsilon (measured ≤ 1e-7 on
    # 64-pixel maps): tolerance 1e-6
    np.testing.assert_allclose(gini(a), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("signed", [False, True])
def test_complexity_matches_quantus(seed, signed):
    x, y, a, s = case(seed, signed=signed)
    theirs = run_quantus(quantus.Complexity(normalise=False, abs=True, disable_warnings=True), x, y, a, s)
    # with Quantus' epsilon inside the log (1e-12) the formula is identical: tolerance 1e-12
    np.testing.assert_allclose(entropy(a, eps=1e-12), theirs, rtol=0, atol=1e-12)
    # the exact entropy (0 log 0 = 0, no epsilon) differs by about n · 1e-12 (measured ≤ 1e-10):
    # tolerance 1e-8
    np.testing.assert_allclose(entropy(a), theirs, rtol=0, atol=1e-8)

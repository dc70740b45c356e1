"""Reliability statistics: ranks, Krippendorff's α, bootstrap, correlation matrices."""

import study  # noqa: F401

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from hypothesis import given, settings
from hypothesis import strategies as st

from study.metrics.reliability import (
    binary_pearson,
    inter_method_reliability,
    internal_consistency,
    jackknife_ci,
    jackknife_interval,
    krippendorff_alpha,
    metric_correlation_matrix,
    off_diagonal_summary,
    point_biserial,
    rank_within_images,
)

PROPERTY = settings(max_examples=30, deadline=None)


def direct_alpha(values: np.ndarray, level: str) -> float:
    """Krippendorff's α from its definition (Tomsett card §2 E3), no missing values.

    values: raters × units. Coincidences o_ck = Σ_u Σ_{i≠j} 1[v_ui = c, v_uj = k] / (m_u − 1);
    α = 1 − D_o / D_e with D_o = Σ o_ck δ²_ck / n and D_e = Σ n_c n_k δ²_ck / (n (n − 1)).
    """
    domain = np.unique(values)
    index = {v: i for i, v in enumerate(domain)}
    o = np.zeros((len(domain), len(domain)))
    raters = values.shape[0]
    for unit in values.T:
        counts = np.zeros(len(domain))
        for v in unit:
            counts[index[v]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (raters - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if level == "interval":
        delta = (domain[:, None] - domain[None, :]) ** 2
    else:  # ordinal
        cumulative = np.concatenate([[0.0], np.cumsum(n_c)])
        delta = np.zeros_like(o)
        for c in range(len(domain)):
            for k in range(len(domain)):
                lo, hi = min(c, k), max(c, k)
                delta[c, k] = (cumulative[hi + 1] - cumulative[lo] - (n_c[c] + n_c[k]) / 2) ** 2
    observed = (o * delta).sum() / n
    expected = (np.outer(n_c, n_c) * delta).sum() / (n * (n - 1))
    return 1 - observed / expected


# ----------------------------------------------------------------------------- ranks


def test_ranks_are_not_argsort():
    scores = np.array([[0.3, 0.1, 0.2]])
    assert rank_within_images(scores).tolist() == [[3.0, 1.0, 2.0]]
    assert np.argsort(scores[0]).tolist() == [1, 2, 0]  # what the quirk would use
    assert rank_within_images([[0.3, 0.3, 0.1]]).tolist() == [[2.5, 2.5, 1.0]]  # ties averaged
    np.testing.assert_array_equal(rank_within_images([[0.3, np.nan, 0.1]], missing="omit"), [[2.0, np.nan, 1.0]])
    with pytest.raises(ValueError, match="missing"):
        rank_within_images([[0.3, 0.1]], missing="drop")
    with pytest.raises(ValueError):
        rank_within_images([[0.3, np.nan, 0.1]])  # NaN only with missing="omit"


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_negating_a_metric_reverses_every_ranking(seed):
    scores = np.random.default_rng(seed).normal(size=(7, 5))
    k = scores.shape[1]
    np.testing.assert_array_equal(rank_within_images(-scores), k + 1 - rank_within_images(scores))
    np.testing.assert_array_equal(rank_within_images(scores, higher_is_better=False), rank_within_images(-scores))


# ----------------------------------------------------------------------------- Krippendorff α


def test_alpha_hand_computed():
    # 2 images rank 3 methods [1,2,3] and [1,3,2]: D_o = 4/6; interval D_e = 48/30 -> α = 7/12;
    # ordinal: δ(1,2) = δ(2,3) = 4, δ(1,3) = 16, D_o = 16/6, D_e = 192/30 -> α = 7/12 too
    scores = np.array([[0.1, 0.2, 0.3], [0.1, 0.3, 0.2]])
    assert krippendorff_alpha(scores, level="interval") == pytest.approx(7 / 12, abs=1e-12)
    assert krippendorff_alpha(scores, level="ordinal") == pytest.approx(7 / 12, abs=1e-12)


def test_alpha_is_one_for_identical_rankings():
    rng = np.random.default_rng(0)
    base = rng.normal(size=6)
    scores = base + 0.01 * rng.random((40, 1))  # every image orders the methods the same way
    for level in ("ordinal", "interval"):
        assert krippendorff_alpha(scores, level=level) == pytest.approx(1.0, abs=1e-12)
    assert krippendorff_alpha(-scores, higher_is_better=False) == pytest.approx(1.0, abs=1e-12)


def test_alpha_near_zero_for_independent_random_rankings():
    rng = np.random.default_rng(0)
    scores = np.stack([rng.permutation(6) for _ in range(500)]).astype(float)
    for level in ("ordinal", "interval"):
        assert abs(krippendorff_alpha(scores, level=level)) < 0.05


@pytest.mark.parametrize("level", ["ordinal", "interval"])
def test_alpha_matches_direct_formula(level):
    rng = np.random.default_rng(1)
    for shape in [(30, 4), (200, 6), (5, 3)]:
        scores = rng.integers(0, 4, size=shape).astype(float)  # integer scores: ties in the ranks
        ranks = rank_within_images(scores)
        assert krippendorff_alpha(scores, level=level) == pytest.approx(direct_alpha(ranks, level), abs=1e-9)
        # the argsort variant (Vandersmissen Q2) feeds sort orders instead
        orders = np.argsort(scores, axis=1, kind="stable").astype(float)
        assert krippendorff_alpha(scores, level=level, ranking="argsort") == pytest.approx(
            direct_alpha(orders, level), abs=1e-9
        )


def test_argsort_variant_differs_from_ranks():
    scores = np.array([[0.3, 0.1, 0.2], [0.3, 0.2, 0.1], [0.2, 0.1, 0.3]])
    assert krippendorff_alpha(scores, level="interval", ranking="argsort") != pytest.approx(
        krippendorff_alpha(scores, level="interval")
    )


def test_alpha_bad_inputs():
    good = np.random.default_rng(0).random((5, 3))
    with pytest.raises(ValueError, match="unknown level"):
        krippendorff_alpha(good, level="cardinal")
    with pytest.raises(ValueError, match="unknown ranking"):
        krippendorff_alpha(good, ranking="order")
    bad = good.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        krippendorff_alpha(bad)
    with pytest.raises(ValueError, match="undefined"):
        krippendorff_alpha(np.ones((5, 3)))
    with pytest.raises(ValueError, match="2-D"):
        krippendorff_alpha(np.ones(5))
    with pytest.raises(ValueError, match="True or False"):
        krippendorff_alpha(good, higher_is_better="yes")


# ----------------------------------------------------------------------------- jackknife


def test_jackknife_ci_of_a_mean_is_the_t_interval():
    """For the mean the pseudo-values are the data themselves: the jackknife t interval is the t interval."""
    from scipy import stats

    data = np.random.default_rng(0).normal(size=50)
    ci = jackknife_ci(np.mean, data)
    expected = stats.ttest_1samp(data, 0.0).confidence_interval()
    assert ci.estimate == pytest.approx(data.mean()) and ci.n == 50
    assert (ci.low, ci.high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert jackknife_ci(lambda f: f[0].mean(), pd.DataFrame({0: data})) == ci


def test_jackknife_ci_bad_inputs():
    scores = np.random.default_rng(1).normal(size=(10, 3))
    with pytest.raises(ValueError, match="callable"):
        jackknife_ci(0.5, scores)
    with pytest.raises(ValueError, match="level"):
        jackknife_ci(np.mean, scores, level=95)
    with pytest.raises(ValueError, match="at least 3 images"):
        jackknife_ci(np.mean, scores[:2])
    with pytest.raises(ValueError, match="finite"):
        jackknife_ci(lambda x: np.nan, scores)


def test_jackknife_interval_from_leave_one_out_values_is_jackknife_ci():
    """The interval from precomputed leave-one-out values is the one jackknife_ci computes, to the bit."""
    data = np.random.default_rng(2).normal(size=(30, 2))

    def statistic(d):
        return float(np.median(d[:, 0]) - d[:, 1].std())

    leave_out = [statistic(np.delete(data, i, axis=0)) for i in range(30)]
    assert jackknife_interval(statistic(data), leave_out) == jackknife_ci(statistic, data)
    assert jackknife_interval(2.0, [2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0, 3)  # no spread: a point


def test_jackknife_interval_bad_inputs():
    with pytest.raises(ValueError, match="at least 3 images"):
        jackknife_interval(0.0, [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        jackknife_interval(0.0, [0.1, np.nan, 0.2])
    with pytest.raises(ValueError, match="finite"):
        jackknife_interval(np.inf, [0.1, 0.3, 0.2])
    with pytest.raises(ValueError, match="one value per image"):
        jackknife_interval(0.0, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="level"):
        jackknife_interval(0.0, [0.1, 0.3, 0.2], level=1.0)


def test_jackknife_alpha_interval_covers_the_known_alpha_and_the_bootstrap_is_biased_upwards():
    """Images drawn from a population whose α is known (α of 20,000 images): the leave-one-image-out
    interval covers it in most of 30 samples of 25 images and is centred on it, while the old
    percentile bootstrap (resampling images with replacement, so duplicated raters agree with
    themselves) sits above it."""
    effects = np.array([0.0, 0.5, 1.0, 1.5, 2.0])

    def draw(seed, n):
        return effects + np.random.default_rng(seed).normal(size=(n, effects.size))

    truth = krippendorff_alpha(draw(123, 20000))
    assert 0.2 < truth < 0.5  # a moderate α, far from the bounds
    covered, jack_centre, boot_centre = 0, [], []
    for replicate in range(30):
        sample = draw(replicate, 25)
        jack = jackknife_ci(krippendorff_alpha, sample)
        boot = stats.bootstrap((np.arange(len(sample)),), lambda rows: krippendorff_alpha(sample[rows]),
                               vectorized=False, n_resamples=60, method="percentile",
                               random_state=np.random.default_rng(replicate)).confidence_interval
        covered += jack.low <= truth <= jack.high
        jack_centre.append((jack.low + jack.high) / 2)
        boot_centre.append((boot.low + boot.high) / 2)
    assert covered >= 26  # nominal 95%: 28.5 of 30
    jack_bias, boot_bias = np.mean(jack_centre) - truth, np.mean(boot_centre) - truth
    assert abs(jack_bias) < 0.02
    assert boot_bias > 0.02 and boot_bias > jack_bias + 0.015


def test_alpha_with_missing_scores_ranks_the_defined_ones():
    scores = np.array([[0.1, 0.2, 0.3], [0.1, np.nan, 0.3], [0.2, 0.4, 0.9], [np.nan, np.nan, 0.5]])
    omitted = krippendorff_alpha(scores, missing="omit")
    # image 1 ranks its two defined methods [1, 2]; image 3 has one defined score and is dropped
    import krippendorff

    ranks = np.array([[1, 2, 3], [1, np.nan, 2], [1, 2, 3]])
    assert omitted == pytest.approx(krippendorff.alpha(reliability_data=ranks, level_of_measurement="ordinal"))
    with pytest.raises(ValueError, match="NaN"):
        krippendorff_alpha(scores)
    with pytest.raises(ValueError, match="missing must be"):
        krippendorff_alpha(scores, missing="drop")
    with pytest.raises(ValueError, match="at least 2 images"):
        krippendorff_alpha(np.array([[0.1, np.nan], [np.nan, 0.2], [0.3, 0.4]]), missing="omit")


# ----------------------------------------------------------------------------- correlation matrices


def test_inter_method_reliability_hand_computed():
    a = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    scores = np.stack([a, 2 * a, -a], axis=1)  # ρ(A, B) = 1, ρ(A, C) = ρ(B, C) = −1
    matrix, summary = inter_method_reliability(scores, ["A", "B", "C"])
    assert list(matrix.index) == ["A", "B", "C"]
    np.testing.assert_allclose(matrix.to_numpy(), [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
    assert summary == pytest.approx({"mean": -1 / 3, "min": -1.0, "max": 1.0, "n_pairs": 3, "n_undefined": 0})


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_matrices_symmetric_unit_diagonal_summary_excludes_diagonal(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(12, 4))
    matrix, summary = inter_method_reliability(scores)
    m = matrix.to_numpy()
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    off = m[~np.eye(4, dtype=bool)]
    assert summary["mean"] == pytest.approx(off.mean()) and summary["max"] == pytest.approx(off.max())
    assert summary["mean"] < 1  # the unit diagonal would inflate it
    # each ρ is the pairwise Spearman (Tomsett Q6)
    from scipy.stats import spearmanr

    assert m[0, 2] == pytest.approx(spearmanr(scores[:, 0], scores[:, 2]).statistic)


def test_internal_consistency_sign_alignment():
    rng = np.random.default_rng(3)
    morf = rng.normal(size=30)
    scores = {"morf": morf, "neg_copy": -morf, "other": rng.normal(size=30)}
    matrix = internal_consistency(scores, {"morf": True, "neg_copy": False, "other": True})
    assert matrix.loc["morf", "neg_copy"] == pytest.approx(1.0)
    unaligned = internal_consistency(scores)
    assert unaligned.loc["morf", "neg_copy"] == pytest.approx(-1.0)
    assert matrix.loc["morf", "other"] == pytest.approx(unaligned.loc["morf", "other"])
    assert matrix.loc["neg_copy", "other"] == pytest.approx(-unaligned.loc["neg_copy", "other"])
    with pytest.raises(ValueError, match="lacks a direction"):
        internal_consistency(scores, {"morf": True})
    with pytest.raises(ValueError, match="unknown metrics"):
        internal_consistency(scores, {"morf": True, "neg_copy": False, "other": True, "x": True})
    with pytest.raises(ValueError, match="constant"):
        internal_consistency({"a": morf, "b": np.ones(30)})
    with pytest.raises(ValueError, match="same images"):
        internal_consistency({"a": morf, "b": morf[:10]})


def test_point_biserial_and_phi_known_values():
    # binary [0,0,1,1] vs [1,2,3,4]: cov 2, Σ(x−x̄)² = 1, Σ(y−ȳ)² = 5 -> r = 2/√5
    assert point_biserial([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / np.sqrt(5))
    rng = np.random.default_rng(4)
    b, c = rng.random(50) < 0.4, rng.normal(size=50)
    assert point_biserial(b, c) == pytest.approx(np.corrcoef(b.astype(float), c)[0, 1])
    assert binary_pearson([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)
    assert binary_pearson([1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert binary_pearson([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="binary"):
        point_biserial([0, 0.5, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="constant"):
        binary_pearson([1, 1, 1], [0, 1, 0])


def test_metric_correlation_matrix_chooses_by_type_and_flips():
    rng = np.random.default_rng(5)
    n = 40
    deletion = rng.random(n)
    insertion = -deletion + 0.3 * rng.random(n)
    hit = (rng.random(n) < 0.5).astype(float)
    hit2 = np.where(rng.random(n) < 0.8, hit, 1 - hit)
    scores = {"deletion": deletion, "insertion": insertion, "pointing": hit, "pointing2": hit2}
    directions = {"deletion": False, "insertion": True, "pointing": True, "pointing2": True}
    matrix, kinds = metric_correlation_matrix(scores, directions, return_kinds=True)
    assert kinds.loc["deletion", "insertion"] == "spearman"
    assert kinds.loc["pointing", "insertion"] == kinds.loc["insertion", "pointing"] == "point-biserial"
    assert kinds.loc["pointing", "pointing2"] == "pearson (phi)"
    m = matrix.to_numpy()
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    from scipy.stats import spearmanr

    assert matrix.loc["deletion", "insertion"] == pytest.approx(spearmanr(1 - deletion, insertion).statistic)
    assert matrix.loc["insertion", "pointing"] == pytest.approx(point_biserial(hit, insertion))
    assert matrix.loc["pointing", "pointing2"] == pytest.approx(binary_pearson(hit, hit2))
    # flipping a metric to 1 − x negates every correlation involving it (Vandersmissen §7.9)
    flipped = metric_correlation_matrix(scores, {**directions, "pointing": False})
    np.testing.assert_allclose(flipped.loc["pointing"].drop("pointing"), -matrix.loc["pointing"].drop("pointing"))
    # declaring the binary metrics explicitly gives the same matrix
    pd.testing.assert_frame_equal(metric_correlation_matrix(scores, directions, binary=["pointing", "pointing2"]), matrix)
    with pytest.raises(ValueError, match="declared binary"):
        metric_correlation_matrix(scores, directions, binary=["deletion"])


def test_off_diagonal_summary_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        off_diagonal_summary(np.ones((2, 3)))

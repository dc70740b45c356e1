"""Verdict rules decided from intervals, the uncertainty helpers, and the machine-independent check."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study.findings import (NOT_ESTIMATED, VERDICTS, bootstrap_units, check_summary, correlation_interval,
                            describe_interval, findings_table, interval_verdict, mean_interval)


@pytest.mark.parametrize("low, high, verdict", [(0.6, 0.9, "reproduced"), (0.1, 0.4, "not reproduced"),
                                                (0.4, 0.6, "inconclusive"), (0.2, 0.5, "not reproduced")])
def test_interval_verdict_needs_the_whole_interval_above(low, high, verdict):
    assert interval_verdict(low, high, 0.5) == verdict


def test_interval_verdict_below_mirrors_above():
    assert interval_verdict(0.1, 0.4, 0.5, above=False) == "reproduced"
    assert interval_verdict(0.6, 0.9, 0.5, above=False) == "not reproduced"
    assert interval_verdict(0.4, 0.6, 0.5, above=False) == "inconclusive"


def test_interval_verdict_flips_when_the_table_moves_across_the_threshold():
    good = [0.8, 0.85, 0.9, 0.82, 0.88]
    bad = [0.1, 0.2, 0.15, 0.12, 0.18]
    assert interval_verdict(*mean_interval(good)[1:], 0.5) == "reproduced"
    assert interval_verdict(*mean_interval(bad)[1:], 0.5) == "not reproduced"
    assert interval_verdict(*mean_interval([0.1, 0.9, 0.4, 0.7, 0.3])[1:], 0.5) == "inconclusive"


def test_interval_verdict_rejects_nan_and_empty_intervals():
    with pytest.raises(ValueError, match="finite"):
        interval_verdict(float("nan"), 1.0, 0.5)
    with pytest.raises(ValueError, match="empty"):
        interval_verdict(0.9, 0.1, 0.5)


def test_mean_interval_t_matches_the_hand_computed_student_interval():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    mean, low, high = mean_interval(x)
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / 2  # sem = sd / sqrt(4)
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, abs=1e-12) and high == pytest.approx(2.5 + half, abs=1e-12)


def test_mean_interval_bootstrap_contains_the_mean_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 1.0, size=40)
    first = mean_interval(x, method="bootstrap", seed=3)
    assert first == mean_interval(x, method="bootstrap", seed=3)
    assert first[1] < first[0] < first[2]


def test_mean_interval_drops_nan_and_degenerates_to_the_point_for_one_unit():
    assert mean_interval([0.3, float("nan")]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError, match="non-NaN"):
        mean_interval([float("nan")])
    with pytest.raises(ValueError, match="infinite"):
        mean_interval([1.0, float("inf")])
    with pytest.raises(ValueError, match="unknown method"):
        mean_interval([1.0, 2.0], method="jackknife")


def test_findings_table_has_profile_n_and_uncertainty(tmp_path):
    table = findings_table([
        {"claim": "a", "paper": "p", "this_run": "r", "verdict": "inconclusive", "n": 5,
         "uncertainty": describe_interval(0.5, 0.4, 0.6, 5)},
        {"claim": "b", "paper": "p", "this_run": "r", "verdict": "not tested"},
    ], tmp_path, profile="quick")
    written = pd.read_csv(tmp_path / "findings.csv", keep_default_na=False)
    assert list(written.columns) == ["claim", "paper", "this_run", "verdict", "profile", "n", "uncertainty"]
    assert written["profile"].tolist() == ["quick", "quick"]
    assert written["uncertainty"].tolist() == ["0.50 [0.40, 0.60], 95% t CI over 5 seeds", NOT_ESTIMATED]
    assert "inconclusive" in VERDICTS and table.loc[0, "n"] == 5


def test_check_summary_prints_claims_not_verdicts():
    table = pd.DataFrame({"claim": ["x", "y"], "verdict": ["reproduced", "inconclusive"]})
    text = check_summary(table)
    assert text == "2 claims, every verdict one of the allowed: True\n- x\n- y"
    assert "reproduced" not in text and "inconclusive" not in text


def _tour_inputs(accuracy, energies, area=0.2):
    from study.experiments import tour
    run = {"splits": {"train": {"labels": np.arange(4).repeat(10)}, "test": {"labels": np.zeros(100)}},
           "test": {"accuracy": accuracy}}
    rows = [{"method": m, "image": i, "energy_in_mask": e, "mask_fraction": area}
            for m, values in energies.items() for i, e in enumerate(values)]
    return tour.findings(run, pd.DataFrame(rows))


def test_tour_findings_follow_the_intervals():
    on = {"gradient": [0.5, 0.6, 0.55, 0.45], "gradcam": [0.4, 0.5, 0.45, 0.42]}
    good = _tour_inputs(0.9, on)
    assert [r["verdict"] for r in good] == ["reproduced", "reproduced"]
    assert good[0]["n"] == "100 test images" and "Clopper-Pearson" in good[0]["uncertainty"]
    # accuracy 0.55 vs 2 × chance 0.5 with 100 images: the interval straddles the rule
    assert _tour_inputs(0.55, on)[0]["verdict"] == "inconclusive"
    assert _tour_inputs(0.3, on)[0]["verdict"] == "not reproduced"
    off = {"gradient": [0.1, 0.15, 0.12, 0.1], "gradcam": [0.4, 0.5, 0.45, 0.42]}
    assert _tour_inputs(0.9, off)[1]["verdict"] == "not reproduced"
    mixed = {"gradient": [0.1, 0.6, 0.15, 0.5], "gradcam": [0.4, 0.5, 0.45, 0.42]}
    assert _tour_inputs(0.9, mixed)[1]["verdict"] == "inconclusive"


def test_mean_interval_bootstrap_falls_back_to_percentile_where_bca_is_undefined():
    import warnings
    x = np.array([0.0] * 29 + [1.0])  # BCa's acceleration is undefined for this resampling distribution
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, low, high = mean_interval(x, method="bootstrap")
    assert mean == pytest.approx(1 / 30) and 0.0 <= low <= mean <= high


def test_bootstrap_units_known_answer():
    # two units, (1 of 2) and (3 of 4): a resample pools 2/4, 4/6 or 6/8, so the interval is [0.5, 0.75]
    counts, totals = np.array([1.0, 3.0]), np.array([2.0, 4.0])
    share, low, high = bootstrap_units(lambda i: counts[i].sum(-1) / totals[i].sum(-1), 2, vectorized=True)
    assert (share, low, high) == pytest.approx((4 / 6, 0.5, 0.75))


@pytest.mark.parametrize("method", ["percentile", "basic", "BCa"])
@pytest.mark.parametrize("vectorized", [True, False])
def test_bootstrap_units_equals_scipy_resampling_the_paired_data(method, vectorized):
    """Resampling unit indices draws what scipy draws for paired samples: the same interval to the bit."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=17), rng.normal(size=17) ** 2

    def gap(u, v, axis=-1):
        return np.std(u, ddof=1, axis=axis) - np.mean(v, axis=axis)

    reference = stats.bootstrap((x, y), gap, paired=True, vectorized=True, n_resamples=999, method=method,
                                random_state=np.random.default_rng(7)).confidence_interval
    estimate, low, high = bootstrap_units(lambda i: gap(x[i], y[i]), 17, method=method, n_resamples=999, seed=7,
                                          vectorized=vectorized)
    assert estimate == gap(x, y)
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-12)


def test_bootstrap_units_vector_statistic_nan_and_bca_fallback():
    values = np.arange(30.0)
    estimate, low, high = bootstrap_units(lambda i: np.array([values[i].mean(), values[i].min()]), 30,
                                          n_resamples=200)
    assert estimate.shape == low.shape == high.shape == (2,) and (low <= estimate).all() and (estimate <= high).all()
    minimum = bootstrap_units(lambda i: values[i].min(), 30, method="basic", n_resamples=200)
    assert minimum[0] == 0 and minimum[1] < 0 <= minimum[2]  # basic: 2 · estimate − the quantiles
    _, low, high = bootstrap_units(lambda i: np.nan, 5, n_resamples=50)
    assert np.isnan(low) and np.isnan(high)  # an undefined statistic gives an undefined interval, not an error
    import warnings
    x = np.ones(8)  # BCa's acceleration is 0 / 0 here: the percentile interval instead, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_units(lambda i: x[i].mean(-1), 8, method="BCa", vectorized=True) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("kwargs", [{"n_units": 1}, {"n_units": 2.0}, {"n_units": True}, {"method": "bca"},
                                    {"level": 1.0}])
def test_bootstrap_units_rejects_bad_input(kwargs):
    arguments = {"n_units": 10, **kwargs}
    with pytest.raises(ValueError):
        bootstrap_units(np.mean, arguments.pop("n_units"), **arguments)


def test_correlation_interval_pearson_is_scipys_fisher_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.6 * x + rng.normal(size=30)
    result = stats.pearsonr(x, y)
    ci = result.confidence_interval(confidence_level=0.9)
    low, high = correlation_interval(result.statistic, 30, level=0.9)
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_correlation_interval_spearman_known_answer_and_edges():
    # ρ 0.5 over 28 images: atanh(0.5) ± 1.96 · √1.06 / 5 (Fieller, Hartley & Pearson), back through tanh
    assert correlation_interval(0.5, 28, spearman=True) == pytest.approx((0.144702, 0.741087), abs=1e-6)
    low, high = correlation_interval(0.5, 28)
    assert 0.144702 < low and high < 0.741087  # Pearson's SE is the narrower one
    assert correlation_interval(-0.5, 28, spearman=True) == pytest.approx((-0.741087, -0.144702), abs=1e-6)
    assert np.isnan(correlation_interval(0.5, 3)).all()  # n − 3 = 0: undefined
    assert np.isnan(correlation_interval(np.nan, 30)).all()
    assert correlation_interval(1.0 + 1e-15, 30) == (1.0, 1.0)  # perfect: the point (scipy's is within 1e-14)
    assert correlation_interval(-1.0, 30, spearman=True) == (-1.0, -1.0)


@pytest.mark.parametrize("kwargs", [{"n": 10.5}, {"n": True}, {"level": 1.0}, {"r": 1.5}])
def test_correlation_interval_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        correlation_interval(**{"r": 0.3, "n": 10, **kwargs})

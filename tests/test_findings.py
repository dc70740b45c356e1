"""Verdict rules decided from intervals, the uncertainty helpers, and the machine-independent check."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study.findings import (NOT_ESTIMATED, VERDICTS, check_summary, describe_interval, findings_table,
                            interval_verdict, mean_interval)


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

from pathlib import Path

import pytest

from study.findings import findings_table
from study.report import write_findings_report


def test_findings_report_keeps_na_text_and_counts_verdicts(tmp_path):
    findings_table([
        {"claim": "a", "paper": "n/a", "this_run": "0.5", "verdict": "reproduced"},
        {"claim": "b", "paper": "n/a", "this_run": "0.1", "verdict": "not reproduced"},
    ], tmp_path / "01_x")
    (tmp_path / "01_x" / "plot.png").write_bytes(b"png")
    text = write_findings_report(tmp_path).read_text()
    assert "| 01_x | — | 1 reproduced, 1 not reproduced | — | — |" in text
    assert "| a | n/a | 0.5 | reproduced | not measured |" in text
    assert "[plot](01_x/plot.png)" in text


def test_findings_table_rejects_unknown_verdicts_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="verdict"):
        findings_table([{"claim": "a", "paper": "", "this_run": "", "verdict": "yes"}])
    with pytest.raises(ValueError, match="lacks"):
        findings_table([{"claim": "a"}])
    with pytest.raises(ValueError, match="no findings.csv"):
        write_findings_report(tmp_path)


def test_readme_summary_is_rewritten_from_the_report(tmp_path):
    from study.report import README_END, README_START, update_readme_summary
    findings_table([
        {"claim": "a", "paper": "n/a", "this_run": "0.5", "verdict": "reproduced"},
        {"claim": "b", "paper": "n/a", "this_run": "0.1", "verdict": "inconclusive", "n": 5, "uncertainty": "t CI"},
    ], tmp_path / "figs" / "01_x", profile="quick")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nstale table\n{README_END}\noutro\n")
    update_readme_summary(tmp_path / "figs", readme)
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| 01_x | `quick` | 1 reproduced, 1 inconclusive | — | — |" in text
    report = (tmp_path / "figs" / "findings.md").read_text()
    assert "| claim | paper | this_run | verdict | stability | profile | n | uncertainty |" in report
    assert "| b | n/a | 0.1 | inconclusive | not measured | quick | 5 | t CI |" in report
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme_summary(tmp_path / "figs", readme)


def _recorded(committed: dict, verdicts_by_seed: dict):
    """An agreement table as `python -m study robustness --record` writes it."""
    import pandas as pd

    from study.robustness import verdict_agreement
    findings = pd.DataFrame([{"seed": seed, "claim": claim, "verdict": verdict}
                             for seed, verdicts in verdicts_by_seed.items() for claim, verdict in verdicts.items()])
    return verdict_agreement(findings, pd.DataFrame({"claim": list(committed), "verdict": list(committed.values())}))


def _tour_findings(figures, **claims):
    """A committed findings table of 00_tour at quick: claim=(this_run, verdict)."""
    findings_table([{"claim": claim, "paper": "n/a", "this_run": this_run, "verdict": verdict}
                    for claim, (this_run, verdict) in claims.items()], figures / "00_tour", profile="quick")


def test_the_report_shows_how_many_recorded_seed_sets_gave_each_committed_verdict(tmp_path, monkeypatch):
    from study import config, robustness
    figures = tmp_path / "figures"
    _tour_findings(figures, a=("0.5", "reproduced"), b=("0.1", "reproduced"), c=("0.2", "inconclusive"),
                   new=("0.3", "reproduced"))
    by_seed = {0: {"a": "reproduced", "b": "reproduced", "c": "reproduced"},
               1: {"a": "reproduced", "b": "inconclusive", "c": "reproduced"},
               2: {"a": "reproduced", "b": "inconclusive", "c": "reproduced"},
               3: {"a": "reproduced", "b": "inconclusive", "c": "reproduced"},
               4: {"a": "inconclusive", "b": "reproduced", "c": "reproduced"}}
    # c was recorded when its committed verdict was 'reproduced'; it now reads 'inconclusive'
    table = _recorded({"a": "reproduced", "b": "reproduced", "c": "reproduced"}, by_seed)
    monkeypatch.setattr(config, "FIGURES_DIR", figures)
    path = robustness.record(table, "00_tour")
    assert path == figures / "00_tour" / "robustness.csv"
    report = write_findings_report(figures).read_text()
    assert "| a | n/a | 0.5 | reproduced | 4 of 5 seed sets | quick |" in report
    assert "| b | n/a | 0.1 | reproduced | 2 of 5 seed sets; most common: inconclusive (3 of 5) | quick |" in report
    assert "| c | n/a | 0.2 | inconclusive | not measured (recorded against the verdict 'reproduced') | quick |" in report
    assert "| new | n/a | 0.3 | reproduced | not measured | quick |" in report
    assert "| 00_tour | `quick` | 3 reproduced, 1 inconclusive | 1 of 2 (2 not measured) | — |" in report
    # one more seed set agreeing on b makes it stable, and the summary count follows
    by_seed[1]["b"] = "reproduced"
    robustness.record(_recorded({"a": "reproduced", "b": "reproduced", "c": "reproduced"}, by_seed), "00_tour")
    report = write_findings_report(figures).read_text()
    assert "| b | n/a | 0.1 | reproduced | 3 of 5 seed sets |" in report
    by_seed[2]["b"] = "reproduced"
    robustness.record(_recorded({"a": "reproduced", "b": "reproduced", "c": "reproduced"}, by_seed), "00_tour")
    assert "| 3 reproduced, 1 inconclusive | 2 of 2 (2 not measured) |" in write_findings_report(figures).read_text()


def test_only_the_committed_configuration_can_be_recorded(tmp_path):
    from study import robustness, runner
    robustness.check_recordable("quick")
    robustness.check_recordable("quick", cpu_isa="avx2", seeds=[0])  # a machine record of the committed seed
    robustness.check_recordable("quick", threads=1, seeds=[0, 1000])
    with pytest.raises(runner.UsageError, match="committed configuration"):
        robustness.check_recordable("quick", parameters={"n_models": 5})
    with pytest.raises(runner.UsageError, match="must include 0"):
        robustness.check_recordable("quick", cpu_isa="avx2", seeds=[1000, 2000])
    with pytest.raises(runner.UsageError, match="at least two seed sets"):
        robustness.check_recordable("quick", seeds=[0])
    with pytest.raises(runner.UsageError, match="got profile smoke"):
        robustness.check_recordable("smoke")
    one_seed = _recorded({"a": "reproduced"}, {0: {"a": "reproduced"}})
    with pytest.raises(ValueError, match="at least two seed sets"):
        robustness.record(one_seed, "00_tour", tmp_path)
    with pytest.raises(ValueError, match="no committed verdicts"):
        robustness.record(one_seed.drop(columns=["committed"]), "00_tour", tmp_path)
    other_seed = _recorded({"a": "reproduced"}, {7: {"a": "reproduced"}})
    with pytest.raises(ValueError, match="committed seed 0"):
        robustness.record(other_seed, "00_tour", tmp_path, variant="avx2")


def test_variants_name_their_folder_record_and_label():
    from study import robustness
    assert robustness.variant_name() == ""
    assert robustness.variant_name(cpu_isa="avx2") == "avx2"
    assert robustness.variant_name(threads=1, cpu_isa="sse41") == "threads1-sse41"
    assert robustness.variant_label("avx2") == "AVX2"
    assert robustness.variant_label("threads1-sse41") == "1 thread, SSE4.1"
    assert robustness.variant_label("threads4") == "4 threads"
    assert robustness.record_path("00_tour", "", Path("f")) == Path("f/00_tour/robustness.csv")
    assert robustness.record_path("00_tour", "avx2", Path("f")) == Path("f/00_tour/robustness-avx2.csv")
    # a rerun on another machine, in its own arithmetic, named by the user
    assert robustness.variant_name(machine="AMD_EPYC") == "AMD_EPYC"
    assert robustness.variant_name(threads=1, machine="AMD_EPYC") == "AMD_EPYC-threads1"
    assert robustness.variant_label("AMD_EPYC") == "AMD EPYC"
    assert robustness.variant_label("AMD_EPYC-threads1") == "AMD EPYC, 1 thread"
    assert robustness.record_path("00_tour", "AMD_EPYC", Path("f")) == Path("f/00_tour/robustness-AMD_EPYC.csv")


def test_a_machine_record_needs_a_plain_name_and_the_committed_seed():
    from study import robustness, runner
    robustness.check_recordable("quick", machine="AMD_EPYC", seeds=[0])
    with pytest.raises(runner.UsageError, match="must include 0"):
        robustness.check_recordable("quick", machine="AMD_EPYC", seeds=[1000])
    for name in ("AMD EPYC", "epyc-2", "2cores", ""):
        with pytest.raises(runner.UsageError, match="letters, digits and underscores"):
            robustness.check_recordable("quick", machine=name, seeds=[0])
    for name in ("avx2", "SSE41", "threads1"):
        with pytest.raises(runner.UsageError, match="emulated variant"):
            robustness.check_recordable("quick", machine=name, seeds=[0])


def test_the_report_shows_whether_seed_0_kept_each_verdict_under_other_arithmetic(tmp_path, monkeypatch):
    from study import config, robustness
    figures = tmp_path / "figures"
    _tour_findings(figures, a=("0.5", "reproduced"), b=("0.1", "inconclusive"), new=("0.3", "reproduced"))
    monkeypatch.setattr(config, "FIGURES_DIR", figures)
    committed = {"a": "reproduced", "b": "inconclusive"}
    path = robustness.record(_recorded(committed, {0: {"a": "reproduced", "b": "partly reproduced"}}), "00_tour",
                             variant="avx2")
    assert path == figures / "00_tour" / "robustness-avx2.csv"
    report = write_findings_report(figures).read_text()
    assert "| a | n/a | 0.5 | reproduced | not measured; AVX2, seed 0: same | quick |" in report
    assert "| b | n/a | 0.1 | inconclusive | not measured; AVX2, seed 0: partly reproduced | quick |" in report
    assert "| new | n/a | 0.3 | reproduced | not measured; AVX2, seed 0: not measured | quick |" in report
    assert "| 00_tour | `quick` | 2 reproduced, 1 inconclusive | — | AVX2: 1 of 2 (1 not measured) |" in report
    # b comes out the same under AVX2: the count follows; a second variant gets its own entry
    robustness.record(_recorded(committed, {0: committed}), "00_tour", variant="avx2")
    robustness.record(_recorded(committed, {0: {"a": "inconclusive", "b": "inconclusive"}, 7: committed}),
                      "00_tour", variant="threads1")
    report = write_findings_report(figures).read_text()
    assert "| a | n/a | 0.5 | reproduced | not measured; AVX2, seed 0: same; 1 thread, seed 0: inconclusive |" in report
    # what the command line prints after such a rerun
    flipped = _recorded(committed, {0: {"a": "inconclusive", "b": "inconclusive"}})
    assert robustness.machine_summary(flipped, "threads1") == "1 thread, seed 0: 1 of 2 committed verdicts the same"
    assert robustness.machine_summary(_recorded(committed, {0: committed}), "avx2") == "AVX2, seed 0: 2 of 2 committed verdicts the same"
    assert robustness.machine_summary(flipped, "") is None  # default arithmetic: the seed-set summary says it
    assert robustness.machine_summary(_recorded(committed, {7: committed}), "avx2") is None  # no seed 0
    assert "| AVX2: 2 of 2 (1 not measured); 1 thread: 1 of 2 (1 not measured) |" in report

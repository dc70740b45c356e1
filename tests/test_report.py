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
    assert "| 01_x | — | 1 reproduced, 1 not reproduced |" in text
    assert "| a | n/a | 0.5 | reproduced |" in text
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
    assert "| 01_x | `quick` | 1 reproduced, 1 inconclusive |" in text
    report = (tmp_path / "figs" / "findings.md").read_text()
    assert "| claim | paper | this_run | verdict | profile | n | uncertainty |" in report
    assert "| b | n/a | 0.1 | inconclusive | quick | 5 | t CI |" in report
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme_summary(tmp_path / "figs", readme)

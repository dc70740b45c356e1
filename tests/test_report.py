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
    assert "| 01_x | 1 reproduced, 1 not reproduced |" in text
    assert "| a | n/a | 0.5 | reproduced |" in text
    assert "[plot](01_x/plot.png)" in text


def test_findings_table_rejects_unknown_verdicts_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="verdict"):
        findings_table([{"claim": "a", "paper": "", "this_run": "", "verdict": "yes"}])
    with pytest.raises(ValueError, match="lacks"):
        findings_table([{"claim": "a"}])
    with pytest.raises(ValueError, match="no findings.csv"):
        write_findings_report(tmp_path)

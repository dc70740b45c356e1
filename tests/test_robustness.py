"""The robustness report: verdict agreement across seed sets, and the CLI end to end at smoke."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from study.robustness import committed_summary, summary_line, verdict_agreement


def _findings(verdicts_by_seed):
    return pd.DataFrame([{"seed": seed, "claim": claim, "verdict": verdict}
                         for seed, verdicts in verdicts_by_seed.items() for claim, verdict in verdicts.items()])


def test_agreement_counts_the_most_common_verdict_and_compares_with_the_committed_one():
    findings = _findings({
        0: {"A": "reproduced", "B": "inconclusive"},
        1: {"A": "reproduced", "B": "reproduced"},
        2: {"A": "reproduced", "B": "not reproduced"},
        3: {"A": "not reproduced", "B": "reproduced"},
        4: {"A": "reproduced", "B": "inconclusive"},
    })
    committed = pd.DataFrame({"claim": ["A", "B"], "verdict": ["reproduced", "reproduced"]})
    table = verdict_agreement(findings, committed)
    assert list(table.index) == ["A", "B"]
    assert table.loc["A", "agree"] == "4/5" and table.loc["A", "most common"] == "reproduced"
    assert table.loc["B", "agree"] == "2/5"
    assert table.loc["A", "seed 3"] == "not reproduced"
    assert bool(table.loc["A", "same as committed"])
    assert summary_line(table, 4) == "1 of 2 claims keep their verdict in ≥ 4 of 5 seed sets"
    assert committed_summary(table) == "1 of 2 committed verdicts come out the same in ≥ 80% of the seed sets"
    assert committed_summary(verdict_agreement(findings)) is None
    # all five agree on B → both claims pass the ≥ 4 of 5 target
    stable = findings.assign(verdict=lambda f: f["verdict"].where(f["claim"] == "A", "reproduced"))
    assert summary_line(verdict_agreement(stable), 4) == "2 of 2 claims keep their verdict in ≥ 4 of 5 seed sets"


def test_agreement_rejects_tables_without_the_columns_or_rows():
    with pytest.raises(ValueError, match="seed"):
        verdict_agreement(pd.DataFrame({"claim": ["a"], "verdict": ["reproduced"]}))
    with pytest.raises(ValueError, match="empty"):
        verdict_agreement(pd.DataFrame(columns=["seed", "claim", "verdict"]))


def test_robustness_cli_reruns_the_tour_at_smoke(tmp_path):
    done = subprocess.run([sys.executable, "-m", "study", "robustness", "00_tour", "--profile", "smoke",
                           "--seeds", "0,7", "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed 0" in done.stdout and "seed 7" in done.stdout
    assert "of 2 claims keep their verdict in ≥ 2 of 2 seed sets" in done.stdout
    assert (tmp_path / "robustness-00_tour-smoke" / "findings.csv").is_file()


def test_robustness_cli_passes_other_parameters_and_names_the_folder_by_them(tmp_path, cli):
    done = subprocess.run([sys.executable, "-m", "study", "robustness", "00_tour", "--profile", "smoke",
                           "--seeds", "0", "-p", "epochs", "1", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "robustness-00_tour-smoke-epochs=1"
    findings = pd.read_csv(folder / "findings.csv")
    assert (findings["epochs"] == 1).all() and (findings["seed"] == 0).all()
    code, stderr = cli("robustness", "00_tour", "-p", "seed", "3")
    assert code == 2 and "set by --profile and --seeds" in stderr


def test_robustness_cli_rejects_bad_seeds(cli):
    code, stderr = cli("robustness", "00_tour", "--seeds", "a,b")
    assert code == 2 and "--seeds takes comma-separated integers" in stderr


def test_cpu_isa_rerun_retrains_in_its_own_cache_and_restores_the_environment(tmp_path, monkeypatch, cli):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    done = subprocess.run([sys.executable, "-m", "study", "robustness", "00_tour", "--profile", "smoke",
                           "--seeds", "0", "--cpu-isa", "avx2", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "robustness-00_tour-smoke-avx2"
    assert (folder / "findings.csv").is_file()
    assert any((folder / "cache" / "models").glob("*.pt"))  # the model was trained here, not loaded
    from study import robustness
    with robustness._environment(robustness.CPU_ISA_ENV["avx2"]):
        assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "ATEN_CPU_CAPABILITY" not in os.environ
    code, stderr = cli("robustness", "00_tour", "--cpu-isa", "mmx")
    assert code == 2 and "--cpu-isa" in stderr


def test_record_is_refused_outside_the_committed_configuration_before_anything_runs(tmp_path, cli):
    code, stderr = cli("robustness", "00_tour", "--profile", "smoke", "--seeds", "0,7", "--record",
                       "--output-dir", str(tmp_path))
    assert code == 2 and "committed configuration" in stderr
    assert not any(tmp_path.iterdir())  # refused before any seed set ran


def test_a_rerun_on_another_machine_is_named_by_it_and_retrains_in_its_own_cache(tmp_path, monkeypatch, cli):
    from study import robustness, sweep
    seen = {}

    def fake_sweep(notebook, grid, name, *args):
        seen.update(name=name, grid=grid, cache=os.environ.get("STUDY_CACHE_DIR"),
                    isa=os.environ.get("ATEN_CPU_CAPABILITY"))
        findings = pd.DataFrame({"seed": [0], "claim": ["a"], "verdict": ["reproduced"]})
        return [{"status": "ok", "point": "seed=0", "error": None}], {"findings": findings}

    monkeypatch.setattr(sweep, "sweep", fake_sweep)
    monkeypatch.delenv("STUDY_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    table, _ = robustness.robustness("00_tour", [0], runs_dir=tmp_path, machine="AMD_EPYC")
    assert seen["name"] == "robustness-00_tour-quick-AMD_EPYC"
    assert seen["cache"] == str((tmp_path / "robustness-00_tour-quick-AMD_EPYC" / "cache").resolve())
    assert seen["isa"] is None  # nothing emulated: the machine's own arithmetic
    assert "STUDY_CACHE_DIR" not in os.environ
    assert table.loc["a", "seed 0"] == "reproduced"
    code, stderr = cli("robustness", "00_tour", "--seeds", "0", "--machine", "AMD EPYC", "--output-dir", str(tmp_path))
    assert code == 2 and "--machine takes letters" in stderr


def test_a_machine_record_without_the_committed_seed_is_refused_before_anything_runs(tmp_path, cli):
    code, stderr = cli("robustness", "00_tour", "--seeds", "7", "--cpu-isa", "avx2", "--record",
                       "--output-dir", str(tmp_path))
    assert code == 2 and "must include 0" in stderr
    code, stderr = cli("robustness", "00_tour", "--seeds", "7", "--machine", "AMD_EPYC", "--record",
                       "--output-dir", str(tmp_path))
    assert code == 2 and "must include 0" in stderr
    assert not any(tmp_path.iterdir())

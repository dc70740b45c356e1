"""The command line: a smoke run of the tour, usage errors (exit 2), a failing notebook (exit 1)."""

import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from study import config


def _study(*args: str, cwd=config.ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_smoke_run_of_the_tour(tmp_path):
    # a relative --output-dir is relative to where the user stands, for the notebook and its figures alike
    done = _study("run", "00_tour", "-p", "profile", "smoke", "-p", "seed", "3", "--output-dir", "runs/x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without encryption" not in done.stderr  # kernels on IPC, not TCP
    assert not list(config.NOTEBOOKS_DIR.glob("kernel-ipc*"))  # sockets per kernel in the runtime dir, removed after
    tmp_path = tmp_path / "runs" / "x"
    executed = nbformat.read(tmp_path / "00_tour.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "seed = 3" in injected[0].source and 'profile = "smoke"' in injected[0].source
    figures = tmp_path / "figures" / "00_tour"
    for name in ("datasets", "attribution_maps"):
        assert (figures / f"{name}.png").stat().st_size > 0
        assert len(pd.read_csv(figures / f"{name}.csv")) > 0
    assert list(pd.read_csv(figures / "findings.csv").columns) == ["claim", "paper", "this_run", "verdict", "profile", "n", "uncertainty"]


@pytest.mark.parametrize("args, message", [
    (["run", "notebooks/99_missing.ipynb"], "unknown notebook"),
    (["run", "00_tour", "-p", "profile", "huge"], "unknown profile"),
    (["run", "00_tour", "-p", "learning_rate", "0.1"], "does not declare parameter(s) ['learning_rate']"),
    (["reproduce", "--profile", "huge"], "unknown profile"),
    (["reproduce", "--profile", "smoke", "--only", "nope"], "unknown notebook"),
])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, cli, args, message):
    code, stderr = cli(*args, "--output-dir", str(tmp_path / "out"))
    assert code == 2
    assert message in stderr
    assert not (tmp_path / "out").exists()


def test_a_usage_error_exits_2_from_the_shell(tmp_path):
    done = _study("run", "00_tour", "-p", "profile", "huge", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2 and "unknown profile" in done.stderr
    assert not (tmp_path / "out").exists()


def test_failing_notebook_exits_nonzero_naming_the_cell(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise RuntimeError('boom in the third cell')"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "01_failing.ipynb"
    nbformat.write(nb, path)
    done = _study("run", str(path), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "01_failing.ipynb failed in the cell with execution count 3" in done.stderr
    assert "raise RuntimeError('boom in the third cell')" in done.stderr
    assert "RuntimeError: boom in the third cell" in done.stderr
    assert (tmp_path / "out" / "01_failing.failed.ipynb").exists()
    assert not (tmp_path / "out" / "01_failing.ipynb").exists()


def test_parse_value_reads_literals():
    from study.runner import parse_value
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("None") is None
    assert parse_value("synth_objects_64") == "synth_objects_64"


def test_every_notebook_declares_the_standard_parameters():
    """papermill silently drops parameters whose line it cannot parse: every assignment must survive."""
    from study.runner import declared_parameters, list_notebooks
    standard = {"profile", "seed", "device", "dataset", "data_root", "figures_dir"}
    notebooks = list_notebooks()
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line.split("#")[0]}
        declared = set(declared_parameters(path))
        assert standard <= declared, path.name
        assert assigned == declared, (path.name, assigned ^ declared)
        assert declared_parameters(path)["profile"]["default"].strip("'\"") == "quick"

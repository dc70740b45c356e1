"""Sweeps: grid parsing, and a two-worker LocalCluster sweep of the tour at smoke size."""

import json

import pytest

from study import cache, sweep
from study.runner import UsageError, find_notebook


def test_grid_values_and_points():
    assert sweep.parse_grid_values("0..3") == [0, 1, 2, 3]
    assert sweep.parse_grid_values("1e-3,1e-4") == [1e-3, 1e-4]
    assert sweep.parse_grid_values("smoke") == ["smoke"]
    with pytest.raises(UsageError, match="empty range"):
        sweep.parse_grid_values("3..1")
    points = sweep.expand_grid({"seed": [0, 1], "lr": [0.1, 0.2]})
    assert points == [{"seed": 0, "lr": 0.1}, {"seed": 0, "lr": 0.2}, {"seed": 1, "lr": 0.1}, {"seed": 1, "lr": 0.2}]
    assert sweep.point_name({"seed": 0, "dataset": "a b/c"}) == "seed=0_dataset=a-b-c"


def test_unknown_parameter_is_rejected_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match="does not declare"):
        sweep.sweep("00_tour", {"nope": [1]}, runs_dir=tmp_path, executor="local")
    assert not any(tmp_path.iterdir())


def test_dask_sweep_of_the_tour_runs_skips_and_reports_failures(tmp_path):
    grid = {"profile": ["smoke"], "seed": [0, 1], "epochs": [1, "broken"]}
    outcomes, tables = sweep.sweep("00_tour", grid, name="t", executor="dask", workers=2, runs_dir=tmp_path)
    status = {(o["point"]["seed"], o["point"]["epochs"]): o["status"] for o in outcomes}
    assert status == {(0, 1): "done", (1, 1): "done", (0, "broken"): "failed", (1, "broken"): "failed"}
    assert all("broken" in o["error"] for o in outcomes if o["status"] == "failed")
    findings = tables["findings"]
    assert set(findings["seed"]) == {0, 1} and set(findings["epochs"]) == {1}
    assert (tmp_path / "t" / "findings.csv").exists()
    assert (tmp_path / "t" / "profile=smoke_seed=0_epochs=1" / "00_tour.ipynb").exists()
    again, _ = sweep.sweep("00_tour", {"profile": ["smoke"], "seed": [0, 1], "epochs": [1]}, name="t",
                           executor="local", runs_dir=tmp_path)
    assert [o["status"] for o in again] == ["skipped", "skipped"]


def _finished(folder, point, code):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").write_text(json.dumps({"point": point, "code": code}))


def test_a_folder_finished_for_another_point_is_not_taken_for_this_one(tmp_path):
    """'a/b' and 'a-b' share a folder name: the second is reported, never skipped as done."""
    first, second = {"dataset": "a/b"}, {"dataset": "a-b"}
    assert sweep.point_name(first) == sweep.point_name(second)
    folder = tmp_path / sweep.point_name(first)
    code = cache.code_key(find_notebook("00_tour"))
    _finished(folder, first, code)
    assert sweep.run_point("00_tour", first, str(folder))["status"] == "skipped"
    clash = sweep.run_point("00_tour", second, str(folder))
    assert clash["status"] == "failed" and "holds the finished point" in clash["error"]
    _finished(tmp_path / "t", {"seeds": [1, 2]}, code)  # a tuple comes back from JSON as a list
    assert sweep.run_point("00_tour", {"seeds": (1, 2)}, str(tmp_path / "t"))["status"] == "skipped"


def test_a_point_finished_with_other_code_runs_again(tmp_path, monkeypatch):
    """A finished point is reused only if the notebook's code cells and the study package are the ones
    it ran with; otherwise (or for a marker that recorded no code) it is redone, never mixed in."""
    point = {"profile": "smoke", "seed": 0}
    ran = []
    monkeypatch.setattr(sweep.runner, "run_notebook", lambda notebook, parameters, **kw: ran.append(parameters))
    folder = tmp_path / "p"
    _finished(folder, point, "an older code key")
    assert sweep.run_point("00_tour", point, str(folder))["status"] == "redone" and len(ran) == 1
    assert json.loads((folder / "done.json").read_text()) == {"point": point,
                                                               "code": cache.code_key(find_notebook("00_tour"))}
    assert sweep.run_point("00_tour", point, str(folder))["status"] == "skipped" and len(ran) == 1
    (folder / "done.json").write_text(json.dumps(point))  # written before code was recorded
    assert sweep.run_point("00_tour", point, str(folder))["status"] == "redone" and len(ran) == 2
    assert sweep.run_point("no_such_notebook", point, str(tmp_path / "q"))["status"] == "failed"


def test_code_key_follows_code_cells_not_outputs_or_narrative(tmp_path):
    notebook = json.loads(find_notebook("00_tour").read_text())
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(notebook))
    key = cache.code_key(path)
    code_cell = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    markdown = next(c for c in notebook["cells"] if c["cell_type"] == "markdown")
    code_cell["outputs"], markdown["source"] = [], ["other narrative"]
    path.write_text(json.dumps(notebook))
    assert cache.code_key(path) == key
    code_cell["source"] = ["x = 1  # another step"]
    path.write_text(json.dumps(notebook))
    assert cache.code_key(path) != key
    assert len(key) == cache.KEY_LENGTH and int(key, 16) >= 0


def test_concatenated_tables_keep_the_verdict_n_a_and_read_empty_cells_as_missing(tmp_path):
    """'n/a' is one of the verdicts; pandas' default would read it as NaN (and the robustness
    table then fails to count it)."""
    points, dirs = [{"seed": 0}, {"seed": 1}], [tmp_path / "a", tmp_path / "b"]
    for directory, verdict in zip(dirs, ["n/a", "reproduced"]):
        (directory / "figures").mkdir(parents=True)
        (directory / "figures" / "findings.csv").write_text(f"claim,verdict,value\nC,{verdict},\n")
    table = sweep.concatenate_tables(points, [str(d) for d in dirs])["findings"]
    assert table["verdict"].tolist() == ["n/a", "reproduced"] and table["seed"].tolist() == [0, 1]
    assert table["value"].isna().all()

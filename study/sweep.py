"""Parameter sweeps: a grid of papermill parameters, one task per point, on Dask or in-process."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pandas as pd

from study import cache, config, parallel, runner


def parse_grid_values(text: str) -> list:
    """'0..9' → 0…9 inclusive; 'a,b,c' → three values; anything else → one value (Python literals)."""
    if re.fullmatch(r"-?\d+\.\.-?\d+", text):
        start, stop = (int(v) for v in text.split(".."))
        if stop < start:
            raise runner.UsageError(f"empty range {text!r}: the end must not be below the start")
        return list(range(start, stop + 1))
    return [runner.parse_value(part) for part in text.split(",")] if "," in text else [runner.parse_value(text)]


def expand_grid(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def point_name(point: dict) -> str:
    """A folder name for one point, e.g. {'seed': 0, 'lr': 0.001} → 'seed=0_lr=0.001'."""
    text = "_".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9=._-]", "-", text) or "default"


def run_point(notebook: str, point: dict, point_dir: str) -> dict:
    """Run one point unless it already finished with the same code; never raises (errors are returned).

    Status "skipped": finished before with this notebook code and this `study` package
    (`cache.code_key`); "redone": it had finished with other code (or before code was recorded), so
    it ran again rather than mixing old numbers into the tables; "done"; "failed". A folder that
    holds another finished point (two values with one folder name) is reported as failed, not reused."""
    point_dir = Path(point_dir)
    marker = point_dir / "done.json"
    try:
        code = cache.code_key(runner.find_notebook(notebook))
    except Exception as error:
        return {"point": point, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    status = "done"
    if marker.exists():
        finished = json.loads(marker.read_text())
        finished_point, finished_code = ((finished["point"], finished["code"]) if set(finished) == {"point", "code"}
                                         else (finished, None))  # a marker written before code was recorded
        if finished_point != json.loads(json.dumps(point)):
            return {"point": point, "status": "failed", "error": f"{point_dir} holds the finished point "
                    f"{finished_point}, not {point}: give the sweep another name"}
        if finished_code == code:
            return {"point": point, "status": "skipped", "error": None}
        status = "redone"
        marker.unlink()
    parameters = dict(point)
    parameters.setdefault("figures_dir", str(point_dir / "figures"))
    try:
        runner.run_notebook(notebook, parameters, runs_dir=point_dir, progress=False)
    except Exception as error:  # a failed point must not stop the others
        return {"point": point, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    marker.write_text(json.dumps({"point": point, "code": code}))
    return {"point": point, "status": status, "error": None}


def sweep(
    notebook: str,
    grid: dict[str, list],
    name: str | None = None,
    executor: str = "dask",
    scheduler: str | None = None,
    workers: int = 2,
    runs_dir: Path | None = None,
) -> tuple[list[dict], dict[str, pd.DataFrame]]:
    """Run every point of `grid`; return the per-point outcomes and the concatenated tables.

    executor "dask" submits one task per point to a `distributed.LocalCluster` of `workers`
    processes, or to the scheduler at `scheduler` (e.g. one started by dask-jobqueue on Slurm);
    "local" runs the points one after the other in this process.
    """
    path = runner.find_notebook(notebook)
    if executor not in ("dask", "local"):
        raise runner.UsageError(f"unknown executor {executor!r}; choose 'dask' or 'local'")
    points = expand_grid(grid)
    for point in points:
        runner.check_parameters(path, point)
    sweep_dir = Path(runs_dir or config.RUNS_DIR) / (name or f"sweep-{path.stem}")
    dirs = [str(sweep_dir / point_name(p)) for p in points]
    if executor == "local":
        outcomes = [run_point(str(path), p, d) for p, d in zip(points, dirs)]
    else:
        outcomes = _run_on_dask(str(path), points, dirs, scheduler, workers)
    tables = concatenate_tables(points, dirs)
    for table_name, table in tables.items():
        table.to_csv(sweep_dir / f"{table_name}.csv", index=False)
    return outcomes, tables


def _run_on_dask(notebook: str, points: list[dict], dirs: list[str], scheduler: str | None, workers: int) -> list[dict]:
    return parallel.map_jobs(run_point, [(notebook, p, d) for p, d in zip(points, dirs)], workers=workers,
                             threads=None, scheduler=scheduler)


def concatenate_tables(points: list[dict], dirs: list[str]) -> dict[str, pd.DataFrame]:
    """Every CSV a point wrote, concatenated over points with the parameters as leading columns."""
    collected: dict[str, list[pd.DataFrame]] = {}
    for point, directory in zip(points, dirs):
        for csv in sorted((Path(directory) / "figures").glob("*.csv")):
            table = pd.read_csv(csv, keep_default_na=False, na_values=[""])  # "n/a" is a verdict, not a NaN
            table = table.drop(columns=[key for key in point if key in table.columns])  # e.g. findings' own profile
            for offset, (key, value) in enumerate(point.items()):
                table.insert(offset, key, value)
            collected.setdefault(csv.stem, []).append(table)
    return {name: pd.concat(parts, ignore_index=True) for name, parts in collected.items()}

"""Robustness report: rerun a notebook with other seed sets and count how often each claim's verdict agrees.

A notebook's `seed` parameter seeds everything it draws (data, initial weights, batch order; a
notebook that averages k seeds uses seed, seed + 1, …, seed + k − 1). The default seed sets are
spaced 1000 apart so that no two reruns share a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from study import config, runner, sweep

DEFAULT_SEEDS = (0, 1000, 2000, 3000, 4000)


def verdict_agreement(findings: pd.DataFrame, committed: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim: its verdict under each seed set, the most common verdict, how many seed sets
    gave it (`agree`, as 'k/n'), and, with a committed table, whether the most common verdict is the
    committed one.

    `findings` holds the columns seed, claim and verdict (the sweep's concatenated findings.csv).
    """
    missing = {"seed", "claim", "verdict"} - set(findings.columns)
    if missing:
        raise ValueError(f"findings lacks the columns {sorted(missing)}; it needs seed, claim and verdict")
    if findings.empty:
        raise ValueError("findings is empty: no seed set produced a findings table")
    claims = list(dict.fromkeys(findings["claim"]))
    table = findings.pivot_table(index="claim", columns="seed", values="verdict", aggfunc="first").reindex(claims)
    table.columns = [f"seed {s}" for s in table.columns]
    counts = findings.groupby("claim")["verdict"].agg(lambda v: v.value_counts().iloc[0])
    modal = findings.groupby("claim")["verdict"].agg(lambda v: v.value_counts().index[0])
    runs = findings.groupby("claim")["seed"].nunique()
    table["most common"] = modal.reindex(claims)
    table["agree"] = [f"{counts[c]}/{runs[c]}" for c in claims]
    if committed is not None:
        reference = committed.set_index("claim")["verdict"]
        table["committed"] = [reference.get(c, "—") for c in claims]
        table["same as committed"] = table["most common"] == table["committed"]
    return table


def robustness(
    notebook: str,
    seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
    profile: str = "quick",
    executor: str = "local",
    scheduler: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    runs_dir: Path | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """Run `notebook` at `profile` once per seed set (through the sweep's one parallel map) and tabulate
    the verdicts. `threads` sets OMP_NUM_THREADS for the kernels (another summation order: the check
    that verdicts do not depend on the machine). Finished seed sets are skipped on a rerun."""
    if not seeds:
        raise runner.UsageError("robustness needs at least one seed")
    if threads is not None and threads < 1:
        raise runner.UsageError(f"threads must be a positive integer, got {threads}")
    path = runner.find_notebook(notebook)
    name = f"robustness-{path.stem}-{profile}" + (f"-threads{threads}" if threads else "")
    previous = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        outcomes, tables = sweep.sweep(str(path), {"profile": [profile], "seed": list(seeds)}, name, executor,
                                       scheduler, workers, runs_dir)
    finally:
        if threads:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
    if "findings" not in tables:
        raise runner.NotebookFailed(f"no seed set of {path.name} produced findings.csv: "
                                    + "; ".join(o["error"] or o["status"] for o in outcomes))
    committed_csv = config.FIGURES_DIR / path.stem / "findings.csv"
    committed = pd.read_csv(committed_csv, keep_default_na=False) if committed_csv.is_file() and profile == "quick" else None
    return verdict_agreement(tables["findings"], committed), outcomes


def summary_line(table: pd.DataFrame, at_least: int) -> str:
    """'9 of 10 claims keep their verdict in ≥ 4 of 5 seed sets'."""
    agreed = table["agree"].str.split("/").map(lambda kn: int(kn[0]))
    total = table["agree"].str.split("/").map(lambda kn: int(kn[1])).max()
    return f"{int((agreed >= at_least).sum())} of {len(table)} claims keep their verdict in ≥ {at_least} of {total} seed sets"

"""Robustness report: rerun a notebook with other seed sets and count how often each claim's verdict agrees.

A notebook's `seed` parameter seeds everything it draws (data, initial weights, batch order; a
notebook that averages k seeds uses seed, seed + 1, …, seed + k − 1). The default seed sets are
spaced 1000 apart so that no two reruns share a seed.

`--record` keeps the agreement table of the committed configuration (`quick`, no other setting)
as `figures/<notebook>/robustness.csv`; the findings report then shows, beside every committed
verdict, in how many seed sets it came out the same (`stability`). With `--threads` or `--cpu-isa`
(another machine's arithmetic emulated here), or with `--machine NAME` (run on another machine,
its own arithmetic), and the committed seed among the seed sets, `--record` keeps the table as
`figures/<notebook>/robustness-<variant>.csv` (e.g. `robustness-avx2.csv`, `robustness-AMD_EPYC.csv`),
and the report adds whether the committed seed gave the committed verdict under that arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pandas as pd

from study import config, runner, sweep

DEFAULT_SEEDS = (0, 1000, 2000, 3000, 4000)
COMMITTED_SEED = 0  # every notebook's default `seed`: the one its committed findings come from
RECORD_FILE = "robustness.csv"
NOT_MEASURED = "not measured"
# Cap the instruction set of torch's own kernels (ATen) and of oneDNN's convolutions: other vector
# widths sum in another order, as another machine's CPU does (checked: weights differ at 1e-8–1e-7).
CPU_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
               "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}}


def check_machine_name(machine: str) -> None:
    """A `--machine` name labels a record of another machine's own arithmetic (`AMD_EPYC` is shown as
    'AMD EPYC'): letters, digits and underscores, starting with a letter, and not a name that
    `variant_name` gives the emulated variants."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", machine):
        raise runner.UsageError(f"--machine takes letters, digits and underscores (e.g. AMD_EPYC), got {machine!r}")
    if machine.lower() in CPU_ISA_ENV or re.fullmatch(r"threads\d*", machine.lower()):
        raise runner.UsageError(f"--machine {machine!r} would read as an emulated variant; choose another name")


def variant_name(threads: int | None = None, cpu_isa: str | None = None, machine: str | None = None) -> str:
    """'' for the default arithmetic, else e.g. 'threads1', 'avx2', 'threads1-avx2' or 'AMD_EPYC': it
    names the rerun folder and the record file (`record_path`)."""
    return "-".join(part for part in (machine or "", f"threads{threads}" if threads else "", cpu_isa or "") if part)


def variant_label(variant: str) -> str:
    """'avx2' -> 'AVX2', 'threads1-sse41' -> '1 thread, SSE4.1', 'AMD_EPYC' -> 'AMD EPYC': how the
    findings report names it."""
    labels = {"avx2": "AVX2", "sse41": "SSE4.1"}
    parts = []
    for part in variant.split("-"):
        if re.fullmatch(r"threads\d+", part):
            count = int(part.removeprefix("threads"))
            parts.append(f"{count} thread" + ("s" if count > 1 else ""))
        else:
            parts.append(labels.get(part, part.replace("_", " ")))
    return ", ".join(parts)


def record_path(notebook_stem: str, variant: str = "", figures_dir: Path | None = None) -> Path:
    """`<figures_dir>/<notebook>/robustness.csv`, or `robustness-<variant>.csv` for other arithmetic."""
    name = RECORD_FILE if not variant else f"{Path(RECORD_FILE).stem}-{variant}.csv"
    return Path(figures_dir or config.FIGURES_DIR) / notebook_stem / name


@contextlib.contextmanager
def _environment(updates: dict[str, str]):
    """Set environment variables (inherited by the kernels a sweep starts), restore them after."""
    previous = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    cpu_isa: str | None = None,
    parameters: dict | None = None,
    machine: str | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """Run `notebook` at `profile` once per seed set (through the sweep's one parallel map) and tabulate
    the verdicts. Seed sets finished with the same code are skipped on a rerun. `parameters`: other papermill
    parameters, the same for every seed set (e.g. {"n_models": 5}); they name the folder, so that
    reruns at other settings never mix.

    The stand-ins for another machine: `threads` sets OMP_NUM_THREADS for the kernels (another
    summation order where torch's default thread count is used) and `cpu_isa` ("avx2", "sse41")
    caps the CPU instruction set of torch's and oneDNN's kernels (`CPU_ISA_ENV`). With either, the
    reruns use their own cache folder inside the sweep's folder, so that nothing trained under the
    default settings is reused: every model is retrained under the changed arithmetic. `machine`
    names the machine this runs on, for a rerun on another machine than the committed outputs'
    (`check_machine_name`): nothing is emulated, the reruns only get their own cache folder and name."""
    if not seeds:
        raise runner.UsageError("robustness needs at least one seed")
    if threads is not None and threads < 1:
        raise runner.UsageError(f"threads must be a positive integer, got {threads}")
    if cpu_isa is not None and cpu_isa not in CPU_ISA_ENV:
        raise runner.UsageError(f"unknown cpu_isa {cpu_isa!r}; choose one of {sorted(CPU_ISA_ENV)}")
    if machine is not None:
        check_machine_name(machine)
    path = runner.find_notebook(notebook)
    parameters = dict(parameters or {})
    fixed = {"profile", "seed"} & set(parameters)
    if fixed:
        raise runner.UsageError(f"{sorted(fixed)} are set by --profile and --seeds, not as parameters")
    variant = variant_name(threads, cpu_isa, machine)
    name = (f"robustness-{path.stem}-{profile}" + (f"-{variant}" if variant else "")
            + (f"-{sweep.point_name(dict(sorted(parameters.items())))}" if parameters else ""))
    updates = {**({"OMP_NUM_THREADS": str(threads)} if threads else {}), **CPU_ISA_ENV.get(cpu_isa, {})}
    if variant:
        updates["STUDY_CACHE_DIR"] = str((Path(runs_dir or config.RUNS_DIR) / name / "cache").resolve())
    with _environment(updates):
        grid = {"profile": [profile], "seed": list(seeds), **{key: [value] for key, value in parameters.items()}}
        outcomes, tables = sweep.sweep(str(path), grid, name, executor, scheduler, workers, runs_dir)
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


def check_recordable(profile: str = "quick", *, threads: int | None = None, cpu_isa: str | None = None,
                     parameters: dict | None = None, seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
                     machine: str | None = None) -> None:
    """Only the committed configuration describes the committed verdicts: `quick`, no other
    parameter. With the default arithmetic a record is a seed record (at least two seed sets); with
    `threads`, `cpu_isa` or `machine` it is a machine record, which needs the committed seed
    (`COMMITTED_SEED`). Anything else raises `runner.UsageError`."""
    if profile != "quick" or parameters:
        raise runner.UsageError("--record keeps the seed sets of the committed configuration only (profile quick, "
                                f"no {'-p' if parameters else 'other setting'}); got profile {profile}")
    if machine is not None:
        check_machine_name(machine)
    other_arithmetic = bool(variant_name(threads, cpu_isa, machine))
    if other_arithmetic and COMMITTED_SEED not in seeds:
        raise runner.UsageError(f"--record with --threads, --cpu-isa or --machine compares the committed seed under "
                                f"other arithmetic: --seeds must include {COMMITTED_SEED}")
    if not other_arithmetic and len(set(seeds)) < 2:
        raise runner.UsageError("--record needs at least two seed sets (or --threads / --cpu-isa / --machine for a "
                                "machine record)")


def record(table: pd.DataFrame, notebook: str, figures_dir: Path | None = None, variant: str = "") -> Path:
    """Write an agreement table (`verdict_agreement` with the committed table, from the committed
    configuration: `check_recordable`) to `record_path`, the file the findings report reads: a seed
    record (default arithmetic, at least two seed sets) or, with `variant`, a machine record (the
    committed seed's verdicts under that arithmetic)."""
    if "committed" not in table.columns:
        raise ValueError("the table has no committed verdicts to record against (figures/<notebook>/findings.csv at quick)")
    seeds = [column for column in table.columns if column.startswith("seed ")]
    if not variant and len(seeds) < 2:
        raise ValueError(f"a record needs at least two seed sets, got {len(seeds)}")
    if variant and f"seed {COMMITTED_SEED}" not in seeds:
        raise ValueError(f"a machine record needs the committed seed {COMMITTED_SEED}, got {seeds}")
    path = record_path(runner.find_notebook(notebook).stem, variant, figures_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.rename_axis("claim").reset_index()[["claim", *seeds, "most common", "agree", "committed"]].to_csv(path, index=False)
    return path


def machine_records(folder: Path) -> dict[str, pd.DataFrame]:
    """The machine records beside a notebook's findings (`robustness-<variant>.csv`), by variant."""
    prefix = f"{Path(RECORD_FILE).stem}-"
    return {path.stem.removeprefix(prefix): pd.read_csv(path, keep_default_na=False)
            for path in sorted(folder.glob(f"{prefix}*.csv"))}


def machine_stability(findings: pd.DataFrame, recorded: pd.DataFrame) -> list[tuple[str, float | None]]:
    """Per row of a findings table, the committed seed's verdict under a machine record's arithmetic,
    shaped as `stability` gives it: ('same', 1.0), (the other verdict, 0.0), or (`NOT_MEASURED`...,
    None) where the claim was not recorded or was recorded against another committed verdict; count
    them with `stable_count(..., at_least=1)`."""
    column = f"seed {COMMITTED_SEED}"
    result = []
    for verdict, row, missing in _matched_rows(findings, recorded):
        if missing is not None or str(row.get(column, "")) in ("", "nan"):
            result.append(missing or (NOT_MEASURED, None))
        else:
            result.append(("same", 1.0) if str(row[column]) == verdict else (str(row[column]), 0.0))
    return result


def _matched_rows(findings: pd.DataFrame, recorded: pd.DataFrame | None):
    """Per row of a findings table: (its verdict, its recorded row, None), or (its verdict, None, the
    `NOT_MEASURED` entry) where the claim was not recorded or was recorded against another verdict."""
    rows = {} if recorded is None else {str(r["claim"]): r for _, r in recorded.iterrows()}
    for claim, verdict in zip(findings["claim"].astype(str), findings["verdict"].astype(str)):
        row = rows.get(claim)
        if row is None:
            yield verdict, None, (NOT_MEASURED, None)
        elif str(row["committed"]) != verdict:
            yield verdict, None, (f"{NOT_MEASURED} (recorded against the verdict '{row['committed']}')", None)
        else:
            yield verdict, row, None


def stability(findings: pd.DataFrame, recorded: pd.DataFrame | None) -> list[tuple[str, float | None]]:
    """Per row of a findings table, (the `stability` text of its verdict, the share of seed sets
    that gave it) from a recorded agreement table (`record`): the text is 'k of n seed sets', plus
    the most common verdict where it is another; `NOT_MEASURED` (share None) where the claim was not
    recorded, or was recorded against another committed verdict (the findings changed since)."""
    result = []
    for verdict, row, missing in _matched_rows(findings, recorded):
        if missing is not None:
            result.append(missing)
            continue
        verdicts = [str(v) for key, v in row.items() if str(key).startswith("seed ") and str(v) not in ("", "nan")]
        same = sum(v == verdict for v in verdicts)
        text = f"{same} of {len(verdicts)} seed sets"
        if row["most common"] != verdict:
            text += f"; most common: {row['most common']} ({row['agree'].replace('/', ' of ')})"
        result.append((text, same / len(verdicts)))
    return result


def stable_count(stabilities: list[tuple[str, float | None]], at_least: float = 0.8) -> str:
    """'8 of 10': of the measured claims (`stability`), how many gave their committed verdict in
    ≥ `at_least` of the seed sets (4 of 5); '—' when none was measured."""
    shares = [share for _, share in stabilities if share is not None]
    if not shares:
        return "—"
    text = f"{sum(share >= at_least for share in shares)} of {len(shares)}"
    return text + (f" ({len(stabilities) - len(shares)} not measured)" if len(shares) < len(stabilities) else "")


def committed_summary(table: pd.DataFrame) -> str | None:
    """'9 of 12 committed verdicts come out the same in ≥ 80% of the seed sets' (what the findings
    report counts), or None without committed verdicts."""
    if "committed" not in table.columns:
        return None
    stabilities = stability(*_committed_as_findings(table))
    return f"{stable_count(stabilities)} committed verdicts come out the same in ≥ 80% of the seed sets"


def machine_summary(table: pd.DataFrame, variant: str) -> str | None:
    """'AVX2, seed 0: 10 of 11 committed verdicts the same' (what the findings report counts for a
    machine record), or None for the default arithmetic, without committed verdicts or without seed 0."""
    if not variant or "committed" not in table.columns or f"seed {COMMITTED_SEED}" not in table.columns:
        return None
    outcomes = machine_stability(*_committed_as_findings(table))
    return f"{variant_label(variant)}, seed {COMMITTED_SEED}: {stable_count(outcomes, at_least=1)} committed verdicts the same"


def _committed_as_findings(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An agreement table's committed verdicts as a findings table, and the table as a record."""
    recorded = table.rename_axis("claim").reset_index()
    return pd.DataFrame({"claim": recorded["claim"], "verdict": recorded["committed"]}), recorded

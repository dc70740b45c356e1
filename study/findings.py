"""The Findings table every notebook ends with: claim | paper's evidence | this run | verdict."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["claim", "paper", "this_run", "verdict"]
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "not tested", "n/a")


def findings_table(rows: list[dict], figures_dir: str | Path | None = None) -> pd.DataFrame:
    """Validate the rows, and write `<figures_dir>/findings.csv` when a directory is given."""
    if not rows:
        raise ValueError("findings_table needs at least one row")
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"finding {row.get('claim', row)!r} lacks {sorted(missing)}; columns are {COLUMNS}")
        if row["verdict"] not in VERDICTS:
            raise ValueError(f"verdict {row['verdict']!r} is not one of {VERDICTS}")
    table = pd.DataFrame(rows)[COLUMNS]
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(figures_dir) / "findings.csv", index=False)
    return table


def verdict(passed: bool, partly: bool = False) -> str:
    return "reproduced" if passed else ("partly reproduced" if partly else "not reproduced")

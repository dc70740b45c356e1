"""figures/findings.md: one section per notebook with its Findings table and links to its figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study import config


def _markdown_table(table: pd.DataFrame) -> str:
    cells = table.astype(str).map(lambda text: text.replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def write_findings_report(figures_dir: Path | None = None) -> Path:
    """Collect every `<figures_dir>/<notebook>/findings.csv` into `<figures_dir>/findings.md`."""
    figures_dir = Path(figures_dir or config.FIGURES_DIR)
    sections = ["# Findings\n", "Written by `make reproduce` from each notebook's `findings.csv`.\n"]
    summary = []
    for folder in sorted(p for p in figures_dir.iterdir() if (p / "findings.csv").is_file()):
        table = pd.read_csv(folder / "findings.csv", keep_default_na=False)
        counts = table["verdict"].value_counts()
        summary.append(f"| {folder.name} | " + ", ".join(f"{n} {v}" for v, n in counts.items()) + " |")
        figures = " · ".join(f"[{png.stem}]({folder.name}/{png.name})" for png in sorted(folder.glob("*.png")))
        sections += [f"## {folder.name}\n", _markdown_table(table) + "\n", f"Figures: {figures or '—'}\n"]
    if not summary:
        raise ValueError(f"no findings.csv under {figures_dir}; run the notebooks first")
    header = ["| notebook | verdicts |", "|---|---|", *summary, ""]
    report = figures_dir / "findings.md"
    report.write_text("\n".join(sections[:2] + header + sections[2:]))
    return report

"""figures/findings.md: one section per notebook with its Findings table and links to its figures.

Where `figures/<notebook>/robustness.csv` exists (`python -m study robustness NOTEBOOK --record`),
each verdict gets its `stability`: in how many of the recorded seed sets it came out the same. Each
machine record beside it (`robustness-avx2.csv`: `--record --cpu-isa avx2 --seeds 0`, emulated here;
`robustness-AMD_EPYC.csv`: `--record --machine AMD_EPYC --seeds 0`, run on that machine) adds whether
the committed seed gave the same verdict under that arithmetic."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study import config, robustness


def _markdown_table(table: pd.DataFrame) -> str:
    cells = table.astype(str).map(lambda text: text.replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def _counts(table: pd.DataFrame) -> str:
    return ", ".join(f"{n} {v}" for v, n in table["verdict"].value_counts().items())


def _profiles(table: pd.DataFrame) -> str:
    profiles = sorted({p for p in table.get("profile", pd.Series(dtype=str)).astype(str) if p})
    return ", ".join(f"`{p}`" for p in profiles) or "—"


SUMMARY_HEADER = ("| notebook | profile | verdicts | same verdict in ≥ 4 of 5 seed sets "
                  "| same verdict under other arithmetic (seed 0) |")


def write_findings_report(figures_dir: Path | None = None) -> Path:
    """Collect every `<figures_dir>/<notebook>/findings.csv` into `<figures_dir>/findings.md`."""
    figures_dir = Path(figures_dir or config.FIGURES_DIR)
    sections = ["# Findings\n", "Written by `make reproduce` from each notebook's `findings.csv`; `stability`: in how "
                "many seed sets of the last recorded robustness run (`python -m study robustness NOTEBOOK "
                "--record`) the committed verdict came out the same, and whether seed 0 gave it under another "
                "machine's arithmetic where that was recorded (`--record --seeds 0 --machine NAME` on that machine, or "
                "`--cpu-isa avx2` or `sse41` / `--threads 1` emulating it on the committed outputs' machine).\n"]
    summary = []
    for folder in sorted(p for p in figures_dir.iterdir() if (p / "findings.csv").is_file()):
        table = pd.read_csv(folder / "findings.csv", keep_default_na=False)
        record = folder / robustness.RECORD_FILE
        recorded = pd.read_csv(record, keep_default_na=False) if record.is_file() else None
        stabilities = robustness.stability(table, recorded)
        texts = [text for text, _ in stabilities]
        machines = []
        for variant, machine_record in robustness.machine_records(folder).items():
            label = robustness.variant_label(variant)
            outcomes = robustness.machine_stability(table, machine_record)
            texts = [f"{text}; {label}, seed 0: {outcome}" for text, (outcome, _) in zip(texts, outcomes)]
            machines.append(f"{label}: {robustness.stable_count(outcomes, at_least=1)}")
        table.insert(table.columns.get_loc("verdict") + 1, "stability", texts)
        summary.append(f"| {folder.name} | {_profiles(table)} | {_counts(table)} | {robustness.stable_count(stabilities)} "
                       f"| {'; '.join(machines) or '—'} |")
        figures = " · ".join(f"[{png.stem}]({folder.name}/{png.name})" for png in sorted(folder.glob("*.png")))
        sections += [f"## {folder.name}\n", _markdown_table(table) + "\n", f"Figures: {figures or '—'}\n"]
    if not summary:
        raise ValueError(f"no findings.csv under {figures_dir}; run the notebooks first")
    header = [SUMMARY_HEADER, "|---|---|---|---|---|", *summary, ""]
    report = figures_dir / "findings.md"
    report.write_text("\n".join(sections[:2] + header + sections[2:]))
    return report


README_START = "<!-- verdict summary: written by `python -m study report` from figures/findings.md -->"
README_END = "<!-- end of verdict summary -->"


def update_readme_summary(figures_dir: Path | None = None, readme: Path | None = None) -> Path:
    """Rewrite the README's verdict summary (between its two markers) from the findings report.

    The summary is the report's own table (notebook | profile | verdict counts | stable claims), so the README can
    never disagree with `figures/findings.md`."""
    figures_dir = Path(figures_dir or config.FIGURES_DIR)
    readme = Path(readme or config.ROOT / "README.md")
    report = write_findings_report(figures_dir)
    lines = report.read_text().splitlines()
    start = lines.index(SUMMARY_HEADER)
    end = lines.index("", start)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the verdict-summary markers {README_START!r} … {README_END!r}")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    readme.write_text(before + README_START + "\n" + "\n".join(lines[start:end]) + "\n" + README_END + after)
    return readme

"""Command line: `python -m study run|reproduce|sweep|robustness|refresh ...` (see README)."""

from __future__ import annotations

import argparse
import sys

import math

import pandas as pd

from study import config, report, robustness, runner, sweep


def _parameters(pairs: list[list[str]] | None) -> dict:
    return {name: runner.parse_value(value) for name, value in (pairs or [])}


def _add_parameter_option(command: argparse.ArgumentParser, help_text: str) -> None:
    command.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run_cmd = commands.add_parser("run", help="run one notebook headless with papermill parameters")
    run_cmd.add_argument("notebook", help="path or name, e.g. notebooks/00_tour.ipynb or 00_tour")
    _add_parameter_option(run_cmd, "papermill parameter (repeatable); values are Python literals or strings")
    run_cmd.add_argument("--output-dir", help="where the executed copy goes (default runs/<profile>/)")

    reproduce_cmd = commands.add_parser("reproduce", help="run every notebook at one profile")
    reproduce_cmd.add_argument("--profile", default="quick")
    reproduce_cmd.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks")
    reproduce_cmd.add_argument("--output-dir", help="where the executed copies go (default runs/<profile>/)")

    sweep_cmd = commands.add_parser("sweep", help="run a grid of parameters, one task per point (Dask)")
    sweep_cmd.add_argument("notebook")
    sweep_cmd.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUES"),
                       help="grid axis: '0..9' (inclusive range), 'a,b,c' (list) or one value")
    sweep_cmd.add_argument("--name", help="sweep folder under runs/ (default sweep-<notebook>)")
    sweep_cmd.add_argument("--executor", choices=["dask", "local"], default="dask")
    sweep_cmd.add_argument("--scheduler", help="address of a running Dask scheduler (default: a LocalCluster)")
    sweep_cmd.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    sweep_cmd.add_argument("--output-dir", help="parent folder of the sweep (default runs/)")

    robust_cmd = commands.add_parser("robustness", help="rerun a notebook with other seed sets; per claim, how often the verdict agrees")
    robust_cmd.add_argument("notebook")
    robust_cmd.add_argument("--seeds", default=",".join(map(str, robustness.DEFAULT_SEEDS)),
                            help="comma-separated seed sets (the notebook's seed parameter), default %(default)s")
    robust_cmd.add_argument("--profile", default="quick")
    robust_cmd.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the kernels (check machine dependence)")
    robust_cmd.add_argument("--cpu-isa", choices=sorted(robustness.CPU_ISA_ENV),
                            help="cap torch's and oneDNN's CPU instruction set: another machine's arithmetic "
                                 "(retrains everything in a cache of its own)")
    robust_cmd.add_argument("--machine", help="name of this machine (e.g. AMD_EPYC) when it is not the one the committed "
                                              "outputs come from: its own arithmetic, retrained in a cache of its own")
    robust_cmd.add_argument("--executor", choices=["dask", "local"], default="local")
    robust_cmd.add_argument("--scheduler", help="address of a running Dask scheduler")
    robust_cmd.add_argument("--workers", type=int, default=1, help="LocalCluster worker processes (executor dask)")
    robust_cmd.add_argument("--output-dir", help="parent folder of the reruns (default runs/)")
    _add_parameter_option(robust_cmd, "another papermill parameter for every seed set (repeatable), e.g. -p n_models 5")
    robust_cmd.add_argument("--record", action="store_true",
                            help="keep the table as figures/<notebook>/robustness.csv (quick, no -p; with --threads, "
                                 "--cpu-isa or --machine and seed 0: robustness-<variant>.csv) and rewrite the findings report")

    commands.add_parser("report", help="rewrite figures/findings.md and the README's verdict summary from figures/")

    refresh_cmd = commands.add_parser("refresh", help="re-execute committed notebooks in place (developers)")
    refresh_cmd.add_argument("notebooks", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            path = runner.run_notebook(args.notebook, _parameters(args.parameter), runs_dir=args.output_dir)
            print(f"executed copy: {path}")
        elif args.command == "reproduce":
            paths = runner.reproduce(args.profile, args.only, runs_dir=args.output_dir)
            print(f"ran {len(paths)} notebook(s); executed copies in {paths[0].parent if paths else '-'}")
            figures = runner.default_figures_dir(paths[0], args.profile, paths[0].parent).parent
            print(f"findings report: {report.write_findings_report(figures)}")
            if args.profile == "quick" and figures == config.FIGURES_DIR:
                print(f"verdict summary: {report.update_readme_summary(figures)}")
        elif args.command == "report":
            print(f"verdict summary: {report.update_readme_summary()} (from {config.FIGURES_DIR / 'findings.md'})")
        elif args.command == "sweep":
            grid = {name: sweep.parse_grid_values(values) for name, values in (args.parameter or [])}
            outcomes, tables = sweep.sweep(args.notebook, grid, args.name, args.executor, args.scheduler,
                                           args.workers, args.output_dir)
            for outcome in outcomes:
                print(f"{outcome['status']:8} {outcome['point']}" + (f"  {outcome['error']}" if outcome["error"] else ""))
            print(f"tables: {', '.join(sorted(tables)) or 'none'}")
            if any(o["status"] == "failed" for o in outcomes):
                return 1
        elif args.command == "robustness":
            try:
                seeds = [int(part) for part in args.seeds.split(",")]
            except ValueError:
                raise runner.UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
            if args.record:  # refuse before hours of reruns, not after
                robustness.check_recordable(args.profile, threads=args.threads, cpu_isa=args.cpu_isa,
                                            parameters=_parameters(args.parameter), seeds=seeds, machine=args.machine)
            table, outcomes = robustness.robustness(args.notebook, seeds, args.profile, args.executor, args.scheduler,
                                                    args.workers, args.threads, args.output_dir, args.cpu_isa,
                                                    _parameters(args.parameter), args.machine)
            with pd.option_context("display.max_colwidth", 70, "display.width", 250):
                print(table.to_string())
            print(robustness.summary_line(table, at_least=max(1, math.ceil(0.8 * len(seeds)))))
            variant = robustness.variant_name(args.threads, args.cpu_isa, args.machine)
            for line in (robustness.committed_summary(table), robustness.machine_summary(table, variant)):
                if line:
                    print(line)
            failed = [o for o in outcomes if o["status"] == "failed"]
            for outcome in failed:
                print(f"failed {outcome['point']}: {outcome['error']}", file=sys.stderr)
            if failed:
                return 1
            if args.record:
                path = robustness.record(table, args.notebook, variant=variant)
                print(f"recorded: {path}; verdict summary: {report.update_readme_summary()}")
        else:
            for name in args.notebooks:
                print(f"refreshed {runner.refresh_notebook(name)}")
    except runner.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except runner.NotebookFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

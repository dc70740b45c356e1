"""Command line: `python -m study run|reproduce|refresh ...` (see README)."""

from __future__ import annotations

import argparse
import sys

from study import runner


def _parameters(pairs: list[list[str]] | None) -> dict:
    return {name: runner.parse_value(value) for name, value in (pairs or [])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one notebook headless with papermill parameters")
    run.add_argument("notebook", help="path or name, e.g. notebooks/00_tour.ipynb or 00_tour")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="papermill parameter (repeatable); values are Python literals or strings")
    run.add_argument("--output-dir", help="where the executed copy goes (default runs/<profile>/)")

    reproduce = commands.add_parser("reproduce", help="run every notebook at one profile")
    reproduce.add_argument("--profile", default="quick")
    reproduce.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks")
    reproduce.add_argument("--output-dir", help="where the executed copies go (default runs/<profile>/)")

    refresh = commands.add_parser("refresh", help="re-execute committed notebooks in place (developers)")
    refresh.add_argument("notebooks", nargs="+")
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

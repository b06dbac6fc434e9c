"""`vqa-constraints demo` (the whole study: harness/study/demo.py) and `vqa-constraints controls` (the rules on
ground-truth planted models: harness/study/controls.py)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from vqa_constraints.cli import output_folder, run

console = Console(stderr=True)


def add_demo(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole study and write DIR/report.md")
    parser.add_argument("--out", required=True, type=output_folder, metavar="DIR")
    parser.add_argument("--quick", action="store_true", help="planted model only, small limits (a few minutes on 2 cores)")
    parser.add_argument("--models", default=None, metavar="NAME,NAME",
                        help="only these zoo models, e.g. flag-llava-direct (default: planted, and without --quick "
                             "flag-llava and flag-llava-direct); the report covers the models of this run")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo_cli)


def add_controls(subparsers) -> None:
    parser = subparsers.add_parser(
        "controls", help="run the study's rules on ground-truth planted models (known verdicts); writes DIR/controls.json")
    parser.add_argument("--out", required=True, type=output_folder, metavar="DIR")
    parser.add_argument("--quick", action="store_true", help="shorter planted builds (enough for the verdicts)")
    parser.add_argument("--limit", type=int, default=40, help="questions traced, or facts edited, per planted model (default 40)")
    parser.add_argument("--findings", default=None, metavar="N,N",
                        help="only these findings' controls, e.g. 2 (default: every control)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_controls_cli)


def run_controls_cli(args: argparse.Namespace) -> int:
    from harness.study.controls import run_controls  # the library loads when the command runs

    findings = tuple(part.strip() for part in args.findings.split(",")) if args.findings else None
    path = run_controls(args.out, quick=args.quick, limit=args.limit, seed=args.seed, findings=findings)
    document = json.loads(path.read_text())
    table = Table(title="ground-truth controls")
    for column in ("finding", "side", "verdict", "passes", "evidence"):
        table.add_column(column)
    for number, entry in sorted(document["controls"].items()):
        for side in ("positive", "null"):
            passes = entry[side]["passes"]
            table.add_row(number, side, entry[side]["verdict"],
                          "not run" if passes is None else "yes" if passes else "NO", entry[side]["evidence"])
    console.print(table)
    print(path)
    return 0


def run_demo_cli(args: argparse.Namespace) -> int:
    from harness.study.demo import run_demo  # the library loads when the command runs

    # Each step goes through the dispatcher, as a user's command line would.
    models = tuple(part.strip() for part in args.models.split(",")) if args.models else None
    report = run_demo(args.out, run, quick=args.quick, seed=args.seed, models=models)
    print(report)
    return 0

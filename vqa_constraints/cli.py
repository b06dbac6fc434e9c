"""The `vqa-constraints` console entry point.

Subcommands are discovered from the ``vqa_constraints.commands`` entry-point
group (see pyproject.toml): each entry point is a function ``add(subparsers)``
that adds its parser and sets ``func``. The dispatcher therefore knows nothing
about the harness or editing packages, which sit downstream of the dataset.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from vqa_constraints import __version__
from vqa_constraints.errors import UserError

COMMAND_GROUP = "vqa_constraints.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqa-constraints",
        description="Build, score, trace and edit with the VQA-Constraints benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            add_command = entry.load()
        except (ImportError, AttributeError) as error:
            # A broken or half-installed plugin must not take the other commands down.
            print(f"warning: command {entry.name!r} unavailable: {error}", file=sys.stderr)
            continue
        add_command(subparsers)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: results written so far are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


def main() -> None:
    sys.exit(run())

"""`vqa-constraints merge`: combine the finished ``--shard`` outputs of evaluate, trace or attention into the one
output an unsharded run would have written."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqa_constraints.cli import output_folder
from vqa_constraints.errors import UserError


def add_merge(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="combine finished --shard outputs of evaluate, trace or attention into one (refuses overlaps and gaps)",
        description="Combine the outputs of `evaluate --shard I/N`, `trace --shard I/N` or `attention --shard I/N` "
        "into what one unsharded run would have written.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", required=True, type=output_folder, metavar="MERGED_DIR")
    parser.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    # The library loads when the command runs, so that building every command's parser stays light.
    from harness.evaluate import print_table
    from harness.outputs import check_output_folder
    from harness.runs import read_json
    from harness.run_merge import merge_runs
    from harness.tracing.shard_merge import ATTENTION_STATS, TRACE_STATS, merge_attention, merge_traces, output_kind
    from harness.tracing.summaries import print_attention_summary, print_trace_summary

    # Not inside (nor holding) one of the folders it reads; merge_* also require it new or empty.
    check_output_folder(args.out, "--out", "merge", protected=[(run, f"the input {run}") for run in args.runs])
    kinds = {folder: output_kind(folder) for folder in args.runs}
    if len(set(kinds.values())) != 1:
        raise UserError("merge: the folders come from different commands (" +
                        ", ".join(f"{folder}: {kind}" for folder, kind in kinds.items()) + ")")
    kind = kinds[args.runs[0]]
    if kind == "trace":
        out = merge_traces(args.runs, args.out)
        print_trace_summary(read_json(out / TRACE_STATS))
        print(out / TRACE_STATS)
        return 0
    if kind == "attention":
        out = merge_attention(args.runs, args.out)
        print_attention_summary(read_json(out / ATTENTION_STATS), out)
        print(out / ATTENTION_STATS)
        return 0
    out = merge_runs(args.runs, args.out)
    print_table(read_json(out / "results.json"))
    print(out / "results.json")
    return 0

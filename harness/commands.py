"""`vqa-constraints evaluate` and `vqa-constraints merge`: flags in, ``EvalOptions`` / ``merge_runs`` out."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import distributed
from harness.models.loading import add_model_arguments
from vqa_constraints import CONFIGS
from vqa_constraints.cli import output_folder

from harness.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS


def shard(text: str) -> str:
    """``type=`` for --shard I/N (evaluate, trace, attention): a malformed shard is a usage error, "" included."""
    from harness.shards import parse_shard
    from vqa_constraints.errors import UserError

    try:
        if parse_shard(text) is None:  # parse_shard reads "" as "not sharded"
            raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    except UserError as error:  # the parser puts the flag back in front
        raise argparse.ArgumentTypeError(str(error).removeprefix("--shard ")) from None
    return text


def add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on VQA-Constraints (resumable; rerun the same command to continue)",
        description="Score a multimodal model; writes RUN_DIR/samples.jsonl and RUN_DIR/results.json.",
    )
    add_model_arguments(parser)  # --model --dtype --device --revision --trust-remote-code
    parser.add_argument("--data", required=True, help="VQA-Constraints build folder or Hub dataset id")
    parser.add_argument("--config", action="append", dest="configs", metavar="C", help=f"repeatable; one of {', '.join(CONFIGS)} (default: all in the build)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, type=output_folder, metavar="RUN_DIR")
    # Values are checked by harness.evaluate.check_options, first thing, before any data or model is read.
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--limit", type=int, default=None, help="score at most N questions per config")
    parser.add_argument("--scoring", default="both", help="generate | logprob | both (default: both)")
    parser.add_argument("--backend", default="hf", help="hf | vllm (vllm: optional extra, CUDA only)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="vllm back-end: split the model over N GPUs (default 1)")
    parser.add_argument("--shard", default=None, type=shard, metavar="I/N",
                        help="score slice I of N (0-based); combine with `merge`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--data-revision", default=None, help="dataset revision on the Hub")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_evaluate)


@distributed.data_parallel("evaluate")  # torchrun / accelerate launch: one shard per rank
def _run_evaluate(args: argparse.Namespace) -> int:
    from harness.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        model=args.model,
        data=args.data,
        out=args.out,
        configs=args.configs,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.limit,
        scoring=args.scoring,
        backend=args.backend,
        shard=args.shard,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        max_pixels=args.max_pixels,
        tensor_parallel_size=args.tensor_parallel_size,
        revision=args.revision,
        data_revision=args.data_revision,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    path = evaluate(options)
    print(path / "results.json")
    return 0


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
    from harness.outputs import check_output_folder
    from harness.tracing.shard_merge import output_kind
    from vqa_constraints.errors import UserError

    # Not inside (nor holding) one of the folders it reads; merge_* also require it new or empty.
    check_output_folder(args.out, "--out", "merge", protected=[(run, f"the input {run}") for run in args.runs])
    kinds = {folder: output_kind(folder) for folder in args.runs}
    if len(set(kinds.values())) != 1:
        raise UserError("merge: the folders come from different commands (" +
                        ", ".join(f"{folder}: {kind}" for folder, kind in kinds.items()) + ")")
    kind = kinds[args.runs[0]]
    if kind == "trace":
        from harness.tracing.commands import print_summary
        from harness.tracing.shard_merge import TRACE_STATS, merge_traces

        out = merge_traces(args.runs, args.out)
        print_summary(read_json_file(out / TRACE_STATS))
        print(out / TRACE_STATS)
        return 0
    if kind == "attention":
        from harness.tracing.attention_cli import print_summary
        from harness.tracing.shard_merge import ATTENTION_STATS, merge_attention

        out = merge_attention(args.runs, args.out)
        print_summary(read_json_file(out / ATTENTION_STATS), out)
        print(out / ATTENTION_STATS)
        return 0
    from harness.evaluate import print_table
    from harness.shards import merge_runs

    out = merge_runs(args.runs, args.out)
    print_table(read_json_file(out / "results.json"))
    print(out / "results.json")
    return 0


def read_json_file(path: Path) -> dict:
    from harness.runs import read_json

    return read_json(path)

"""`vqa-constraints evaluate` and `vqa-constraints merge`: flags in, ``EvalOptions`` / ``merge_runs`` out."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.models.loading import add_model_arguments
from vqa_constraints import CONFIGS

from harness.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS


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
    parser.add_argument("--out", required=True, type=Path, metavar="RUN_DIR")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--limit", type=int, default=None, help="score at most N questions per config")
    parser.add_argument("--scoring", default="both", help="generate | logprob | both (default: both)")
    parser.add_argument("--backend", default="hf", help="hf | vllm (vllm: generation only, optional extra)")
    parser.add_argument("--shard", default=None, metavar="I/N", help="score slice I of N (0-based); combine with `merge`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--data-revision", default=None, help="dataset revision on the Hub")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_evaluate)


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
        help="combine finished --shard runs into one run (refuses overlaps and gaps)",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", required=True, type=Path, metavar="MERGED_DIR")
    parser.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from harness.evaluate import print_table
    from harness.runs import read_json
    from harness.shards import merge_runs

    out = merge_runs(args.runs, args.out)
    print_table(read_json(out / "results.json"))
    print(out / "results.json")
    return 0

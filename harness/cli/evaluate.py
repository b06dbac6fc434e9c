"""`vqa-constraints evaluate`: flags in, ``EvalOptions`` out."""

from __future__ import annotations

import argparse

from harness.cli import distributed
from harness.cli.args import add_model_arguments, options_from_args, shard
from harness.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from vqa_constraints import CONFIGS
from vqa_constraints.cli import output_folder


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

    options = options_from_args(EvalOptions, args, progress=not args.no_progress)
    path = evaluate(options)
    print(path / "results.json")
    return 0

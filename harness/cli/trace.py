"""`vqa-constraints trace`: MultimodalCausalTrace over one config/split, with a summary table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.cli import distributed
from harness.cli.args import add_model_arguments, options_from_args, shard
from harness.scoring import DEFAULT_MAX_NEW_TOKENS
from harness.tracing.corruptions import CORRUPTIONS, DEFAULT_REPLACE_TOKEN
from harness.tracing.options import ENGINE_NAMES, POSITIONS, PREFIX_SUBJECT, TRACED, TraceOptions, parse_window
from harness.tracing.patching import KINDS
from harness.tracing.targets import TARGETS
from vqa_constraints import CONFIGS
from vqa_constraints.cli import choice_list, finite_float, output_folder, positive_int
from vqa_constraints.errors import UserError


def add_trace(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="causal tracing (MultimodalCausalTrace) of correctly answered questions")
    add_model_arguments(parser)  # --model --dtype --device --revision --trust-remote-code
    parser.add_argument("--data", required=True, help="VQA-Constraints build folder or Hub dataset id")
    parser.add_argument("--config", required=True, choices=CONFIGS)
    parser.add_argument("--out", required=True, type=output_folder,
                        help="output folder (trace_stats.json, traces.parquet, PNGs)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--corruption", default="replace", choices=CORRUPTIONS)
    parser.add_argument("--replace-token", default=DEFAULT_REPLACE_TOKEN,
                        help="word whose token (as it is tokenized after a space inside a sentence) replaces every "
                             "constraint token (replace corruption)")
    parser.add_argument("--kinds", default=",".join(KINDS), type=choice_list(KINDS), help="comma list of hidden,mlp,attn")
    parser.add_argument("--window", type=_window, default=1,
                        help="consecutive layers restored together: a number for every kind (default 1, the paper's "
                             "LLaVA setting), 'rome' (hidden 1; MLP and attention ROME's 10 of 48 layers scaled to the "
                             "model's depth), or per kind e.g. 'hidden=1,mlp=5,attn=5'")
    parser.add_argument("--prefix-subject", default="corrupt", choices=PREFIX_SUBJECT,
                        help="corrupt (default): when the model's own words before the answer name the subject, corrupt "
                             "those tokens too, so the corrupted run is not handed what the corruption removes; keep: "
                             "feed them unchanged (the subject leaks; for comparison only)")
    parser.add_argument("--positions", default="constraint", choices=POSITIONS,
                        help="constraint: each constraint's tokens and the last token; last: last token only; all: also every text position")
    parser.add_argument("--target", default="answer", choices=TARGETS,
                        help="answer: the gold answer's tokens, teacher forced where the answer begins in the model's "
                             "own greedy output; subject: the same for the question's subject (a model that names the country "
                             "before answering: the recognition step); first-token: the model's own top first token")
    parser.add_argument("--answer", default="first-token", choices=("first-token", "full"),
                        help="with --target first-token: score the model's first token or its whole answer")
    parser.add_argument("--min-affected", type=positive_int, default=5,
                        help="a group with fewer affected questions (corruption halves p_clean) reports null curves")
    parser.add_argument("--limit", type=positive_int, default=None, help="trace at most the first N questions")
    parser.add_argument("--traced", default="correct", choices=TRACED,
                        help="correct: only questions the model answers right (the paper's choice); "
                             "all: every question, tracing the model's own top answer (failure analysis, random models)")
    parser.add_argument("--shard", default=None, type=shard, metavar="I/N",
                        help="trace slice I of N (0-based) of the questions; combine the outputs with `merge`")
    parser.add_argument("--text-only", action="store_true", help="trace the language model alone on text_only_question")
    parser.add_argument("--engine", default="fast", choices=sorted(ENGINE_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-samples", type=positive_int, default=5, help="noise draws averaged per example (noise corruptions)")
    parser.add_argument("--threshold", type=finite_float, default=0.1, help="mean normalised effect above which a layer is causal")
    parser.add_argument("--max-batch", type=positive_int, default=64, help="restorations per batch in the fast engine")
    parser.add_argument("--cache-budget", default=None, type=_cache_budget, metavar="SIZE",
                        help="expanded key/value cache per fast-engine batch, e.g. 2GiB or 512MiB (default: half the "
                             "GPU's free memory on CUDA, 1GiB on the CPU)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help="tokens of the model's greedy answer, in which the answer target is found (16; "
                             "sentence answers such as flag-llava's need 24)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _window(text: str):
    try:
        return parse_window(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--window ")) from None


def _cache_budget(text: str) -> int:
    from harness.tracing.engine_fast import parse_bytes  # the engines load only when a trace runs

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@distributed.data_parallel("trace")  # torchrun / accelerate launch: one shard per rank
def _run(args: argparse.Namespace) -> int:
    from harness.outputs import StaleDocuments, check_out

    check_out(args.out, "trace", args.model, args.data)  # before any work
    with StaleDocuments(args.out, "trace"):
        return _trace(args)


def _trace(args: argparse.Namespace) -> int:
    # The engines and everything a trace writes load when the command runs, not when the parser is built.
    from harness.tracing.causal_trace import run_trace
    from harness.tracing.summaries import print_trace_summary

    options = options_from_args(TraceOptions, args, out=Path(args.out), progress=not args.no_progress)
    out = run_trace(options)
    print_trace_summary(json.loads((out / "trace_stats.json").read_text()))
    print(f"wrote {out / 'trace_stats.json'}, {out / 'traces.parquet'} and plots")
    return 0

"""`vqa-constraints trace`: MultimodalCausalTrace over one config/split, with a summary table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.models.loading import add_model_arguments
from .causal_trace import CORRUPTIONS, DEFAULT_REPLACE_TOKEN, ENGINES, KINDS, POSITIONS, TraceOptions, run_trace


def add_trace(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="causal tracing (MultimodalCausalTrace) of correctly answered questions")
    add_model_arguments(parser)  # --model --dtype --device --revision --trust-remote-code
    parser.add_argument("--data", required=True, help="VQA-Constraints build folder or Hub dataset id")
    parser.add_argument("--config", required=True, help="single_constraint | multi_constraint | encyclopedic")
    parser.add_argument("--out", required=True, help="output folder (trace_stats.json, traces.parquet, PNGs)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--corruption", default="replace", choices=CORRUPTIONS)
    parser.add_argument("--replace-token", default=DEFAULT_REPLACE_TOKEN,
                        help="text whose first token replaces every constraint token (replace corruption)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of hidden,mlp,attn")
    parser.add_argument("--window", type=int, default=1, help="consecutive layers restored together")
    parser.add_argument("--positions", default="constraint", choices=POSITIONS,
                        help="constraint: each constraint's tokens and the last token; last: last token only; all: also every text position")
    parser.add_argument("--answer", default="first-token", choices=("first-token", "full"),
                        help="score p of the answer's first token (the model's own top token) or of the whole answer")
    parser.add_argument("--limit", type=int, default=None, help="trace at most the first N questions")
    parser.add_argument("--text-only", action="store_true", help="trace the language model alone on text_only_question")
    parser.add_argument("--engine", default="fast", choices=sorted(ENGINES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-samples", type=int, default=5, help="noise draws averaged per example (noise corruptions)")
    parser.add_argument("--threshold", type=float, default=0.1, help="mean normalised effect above which a layer is causal")
    parser.add_argument("--max-batch", type=int, default=64, help="restorations per batch in the fast engine")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    options = TraceOptions(
        model=args.model, data=args.data, config=args.config, out=Path(args.out), split=args.split,
        corruption=args.corruption, replace_token=args.replace_token,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), window=args.window,
        positions=args.positions, answer=args.answer, limit=args.limit, text_only=args.text_only, engine=args.engine, seed=args.seed,
        noise_samples=args.noise_samples, dtype=args.dtype, device=args.device, revision=args.revision,
        trust_remote_code=args.trust_remote_code, threshold=args.threshold, max_batch=args.max_batch,
        progress=not args.no_progress,
    )
    out = run_trace(options)
    print_summary(json.loads((out / "trace_stats.json").read_text()))
    print(f"wrote {out / 'trace_stats.json'}, {out / 'traces.parquet'} and plots")
    return 0


def print_summary(document: dict) -> None:
    """One table row per (corrupted, target, kind) over all constraint counts."""
    from rich.console import Console
    from rich.table import Table

    counts = document["counts"]
    skipped = counts["skipped"]
    table = Table(title=(f"{document['model']['name']} · {document['data']['config']} · "
                         f"traced {counts['traced']}/{counts['records']} "
                         f"(wrong answer {skipped['wrong_answer']}, constraint not found {skipped['constraint_not_found']})"))
    for column in ("corrupted", "target", "kind", "n", "affected", "p clean", "p corrupt", "peak layer", "peak effect", "causal layers"):
        table.add_column(column)
    for g in document["groups"]:
        if g["num_constraints"] != "all" or g["target"] == "position":
            continue
        peak = g["mean_normalised"][g["peak_layer"]]
        table.add_row(g["corrupted"], g["target"], g["kind"], str(g["n"]), str(g["n_affected"]),
                      f"{g['mean_p_clean']:.3f}", f"{g['mean_p_corrupt']:.3f}", str(g["peak_layer"]),
                      "-" if peak is None else f"{peak:.3f}", ",".join(map(str, g["causal_layers"])) or "-")
    Console().print(table)
    if document.get("peak_mlp_layer") is not None:
        Console().print(f"peak causal MLP layer: {document['peak_mlp_layer']}")

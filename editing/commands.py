"""`vqa-constraints edit`: flags in, ``EditOptions`` -> ``run_editing`` out."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.models.loading import add_model_arguments
from vqa_constraints.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def add_edit(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="edit facts into a model (MultEdit vs fine-tuning) and measure efficacy, generalization, specificity",
        description="Edit requests from a VQA-Constraints build; writes edits.jsonl, editing_results.json, "
        "comparison.md and (with --sweep-layers) efficacy_by_layer.png. The model's files are never changed.",
    )
    add_model_arguments(parser)  # --model --dtype --device --revision --trust-remote-code
    parser.add_argument("--data", required=True, help="VQA-Constraints build folder or Hub dataset id")
    parser.add_argument("--method", default="multedit", help="comma-separated: multedit, ft, ft-l (default: multedit)")
    parser.add_argument("--track", default="insertion", choices=["correction", "insertion"])
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--layers", type=_int_list, default=None, help="e.g. 2 or 3,4 (default: the peak causal MLP layer of a trace of the model)")
    parser.add_argument("--trace-stats", default=None, metavar="PATH", help="trace_stats.json whose peak MLP layer is the default")
    parser.add_argument("--trace-limit", type=int, default=16, metavar="N",
                        help="without --layers/--trace-stats: trace N questions to find the peak MLP layer (default 16)")
    parser.add_argument("--key-position", default="last", choices=["constraint", "last"],
                        help="where MultEdit reads its key: the visual constraint's last token or the final prompt token")
    parser.add_argument("--limit", type=int, default=None, help="at most N edit requests")
    parser.add_argument("--batch-edits", type=int, default=1, metavar="N", help="apply N edits at once (default 1: one at a time)")
    parser.add_argument("--sweep-layers", nargs="?", const=True, default=False, type=_int_list, metavar="LAYERS",
                        help="also edit at every layer (or only LAYERS, e.g. 0,4,8: a 30-layer model on a CPU), "
                             "one at a time, and plot efficacy by layer")
    parser.add_argument("--specificity-size", type=int, default=32, help="unrelated questions checked per edit")
    parser.add_argument("--preserve", type=int, default=0, metavar="N",
                        help="MultEdit: also keep the keys of N validation questions (other subjects) mapped as before "
                             "(default 0)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--save", default=None, metavar="DIR", help="also save the model with all edits (first method) applied")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_edit)


def _run_edit(args: argparse.Namespace) -> int:
    from editing.methods import METHODS
    from editing.runner import EditOptions, run_editing
    from harness.models.loading import load_model

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UserError(f"--method {args.method}: unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    options = EditOptions(
        methods=methods,
        track=args.track,
        layers=args.layers,
        key_position=args.key_position,
        limit=args.limit,
        batch_edits=args.batch_edits,
        sweep_layers=args.sweep_layers,
        seed=args.seed,
        split=args.split,
        specificity_size=args.specificity_size,
        preserve_size=args.preserve,
        trace_stats=args.trace_stats,
        trace_limit=args.trace_limit,
    )
    adapter = load_model(args.model, dtype=args.dtype, device=args.device,
                         trust_remote_code=args.trust_remote_code, revision=args.revision)
    document = run_editing(adapter, args.data, args.out, options, save=args.save)
    from editing.report import table

    print(table(document), end="")
    print(Path(args.out) / "editing_results.json")
    return 0

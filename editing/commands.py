"""`vqa-constraints edit`: flags in, ``EditOptions`` -> ``run_editing`` out."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli import distributed
from harness.cli.args import add_model_arguments, model_options, options_from_args
from harness.scoring import DEFAULT_MAX_NEW_TOKENS
from vqa_constraints.cli import non_negative_int, output_folder, positive_int
from vqa_constraints.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers (0 or more), got {text!r}")
    return layers


def check_layers(count: int, layers: list[int] | None, sweep: list[int] | bool) -> None:
    """--layers / --sweep-layers within the loaded model, checked before any data is read or output written."""
    for flag, chosen in (("--layers", layers), ("--sweep-layers", sweep)):
        bad = [layer for layer in (chosen if isinstance(chosen, list) else []) if layer >= count]
        if bad:
            raise UserError(f"{flag}: layer {bad[0]} is out of range: the model has {count} layers (0..{count - 1})")


def add_edit(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="edit facts into a model (MultEdit vs fine-tuning) and measure efficacy, generalization, specificity",
        description="Edit requests from a VQA-Constraints build; writes edits.jsonl, editing_results.json, "
        "comparison.md and (with --sweep-layers) efficacy_by_layer.png. The model's files are never changed.",
    )
    add_model_arguments(parser)  # --model --dtype --device --revision --trust-remote-code
    parser.add_argument("--data", required=True, help="VQA-Constraints build folder or Hub dataset id")
    parser.add_argument("--method", default="multedit", help="comma-separated: multedit (lambda-I form), multedit-cov "
                        "(key-covariance form, W K = V exactly), memit-ls (MEMIT's least squares), ft, ft-l "
                        "(default: multedit)")
    parser.add_argument("--method-config", default=None, metavar="FILE.yaml",
                        help="hyper-parameters per method, e.g. 'ft-l: {linf_rms: 0.1}' or 'multedit: {lam: auto}' "
                             "(auto: tuned on the validation split); recorded in the results")
    parser.add_argument("--track", default="insertion", choices=["correction", "insertion"])
    parser.add_argument("--out", required=True, type=output_folder, metavar="DIR")
    parser.add_argument("--layers", type=_int_list, default=None, help="e.g. 2 or 3,4 (default: the peak causal MLP layer of a trace of the model)")
    parser.add_argument("--trace-stats", default=None, metavar="PATH", help="trace_stats.json whose peak MLP layer is the default")
    parser.add_argument("--trace-limit", type=positive_int, default=16, metavar="N",
                        help="without --layers/--trace-stats: trace N questions to find the peak MLP layer (default 16)")
    parser.add_argument("--key-position", default="constraint", choices=["constraint", "subject-token", "last", "auto"],
                        help="where MultEdit reads its key: the visual constraint's last token (default, the paper's), "
                             "the last image token (the pictured subject) or the final prompt token; auto: the one "
                             "whose keys are most distinct on the validation split's requests")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"tokens generated per answer (default {DEFAULT_MAX_NEW_TOKENS}; flag-llava needs 24)")
    parser.add_argument("--covariance-source", default="corpus", choices=["corpus", "questions"],
                        help="multedit-cov / memit-ls: estimate the key covariance from the model's own sampled "
                             "text (default) or from validation questions (--key-stats-size of them)")
    parser.add_argument("--corpus-keys", type=positive_int, default=20000, metavar="N",
                        help="keys of the generic corpus (default 20000)")
    parser.add_argument("--key-stats-size", type=positive_int, default=64, metavar="N",
                        help="with --covariance-source questions: validation questions whose keys (every position) "
                             "estimate the key covariance (default 64)")
    parser.add_argument("--per-subject", type=non_negative_int, default=1, metavar="N",
                        help="edit requests per subject (default 1; 0: all)")
    parser.add_argument("--neighbours", type=positive_int, default=8, metavar="N",
                        help="same-relation questions about other subjects scored per edit (default 8)")
    parser.add_argument("--validation-size", type=positive_int, default=12, metavar="N",
                        help="validation requests that automatic choices (key position, tuned values) are made on")
    parser.add_argument("--augment-views", type=non_negative_int, default=2, metavar="N",
                        help="N augmented views (crop, rotation, colour jitter) of each request's image where the "
                             "record has no other views, e.g. one flag per country (default 2)")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most N edit requests")
    parser.add_argument("--batch-edits", type=positive_int, default=1, metavar="N",
                        help="apply N edits at once (default 1: one at a time); batches never hold two requests "
                             "about one subject where that can be arranged")
    parser.add_argument("--sweep-layers", nargs="?", const=True, default=False, type=_int_list, metavar="LAYERS",
                        help="also edit at every layer (or only LAYERS, e.g. 0,4,8: a 30-layer model on a CPU), "
                             "one at a time, and plot efficacy by layer")
    parser.add_argument("--specificity-size", type=positive_int, default=32, help="unrelated questions checked per edit")
    parser.add_argument("--preserve", type=non_negative_int, default=0, metavar="N",
                        help="MultEdit: also keep the keys of N validation questions (other subjects) mapped as before "
                             "(default 0)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--save", default=None, type=output_folder, metavar="DIR",
                        help="also save the model with all edits (first method) applied; DIR must be new, empty or "
                             "an earlier --save output")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --save replace a non-empty folder it did not write (never the model's folder, "
                             "the working directory or the home folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_edit)


@distributed.single_process("edit")  # edits share their key position and layer: not split among ranks
def _run_edit(args: argparse.Namespace) -> int:
    from harness.outputs import StaleDocuments, check_out

    # Before any work: the one --out rule, and --save may not share a folder with --out (it would replace it).
    check_out(args.out, "edit", args.model, args.data,
              also=[(args.save, "the --save folder")] if args.save is not None else ())
    with StaleDocuments(args.out, "edit"):
        return _edit(args)


def _edit(args: argparse.Namespace) -> int:
    from editing.methods import METHODS
    from editing.runner import EditOptions, check_save_target, run_editing
    from harness.models.loading import load_model

    from editing.method_config import load_method_config

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UserError(f"--method {args.method}: unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    method_options = load_method_config(args.method_config) if args.method_config else {}
    options = options_from_args(EditOptions, args, methods=methods, preserve_size=args.preserve,
                                method_options=method_options, per_subject=args.per_subject or None)
    if args.save is not None:
        check_save_target(args.model, args.save, args.overwrite)  # before loading the model
    adapter = load_model(args.model, **model_options(args))  # --dtype --device --device-map --max-pixels ...
    check_layers(adapter.num_layers, args.layers, args.sweep_layers)
    document = run_editing(adapter, args.data, args.out, options, save=args.save, overwrite=args.overwrite)
    from editing.report import table

    print(table(document), end="")
    print(Path(args.out) / "editing_results.json")
    return 0

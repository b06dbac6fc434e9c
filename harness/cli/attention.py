"""`vqa-constraints attention`: attention contributions, knockout and failure prediction for one split."""

from __future__ import annotations

import argparse

from harness.cli import distributed
from harness.cli.args import add_model_arguments, model_options, options_from_args, shard
from harness.scoring import DEFAULT_MAX_NEW_TOKENS
from vqa_constraints import CONFIGS
from vqa_constraints.cli import output_folder, positive_int
from vqa_constraints.errors import UserError


def add_attention(subparsers) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="attention contributions: image -> constraint, constraint -> last token, knockout, AUROC",
        description="Which image tokens feed the visual constraint (per layer), how much the constraint feeds the "
        "last token, a knockout of the top-k image tokens against k random ones, and how well the contribution "
        "and the model's confidence predict a correct answer (AUROC).",
    )
    add_model_arguments(parser)  # --model --dtype --device --revision --trust-remote-code
    parser.add_argument("--data", required=True, help="VQA-Constraints build folder or Hub dataset id")
    parser.add_argument("--config", required=True, choices=CONFIGS)
    parser.add_argument("--out", required=True, type=output_folder, metavar="DIR")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=positive_int, default=None, help="analyse at most N questions")
    parser.add_argument("--shard", default=None, type=shard, metavar="I/N",
                        help="analyse slice I of N (0-based) of the questions; combine the outputs with `merge`")
    parser.add_argument("--top-k", type=positive_int, default=5, help="image tokens blocked in the knockout (default 5)")
    parser.add_argument("--draws", type=positive_int, default=5, help="random k-token draws per question (default 5)")
    parser.add_argument("--layers-for-auroc", type=positive_int, default=3, dest="n_layers",
                        help="layers summed for failure prediction, chosen on a held-out half (default 3)")
    parser.add_argument("--knockout-layers", default=None, type=layer_list, metavar="A-B|L,L,...",
                        help="layers where the knockout cuts attention (default: all)")
    parser.add_argument("--target", default="auto", choices=("auto", "answer", "subject", "first-token"),
                        help="what the knockout scores, read where it is predicted after the model's own prefix: "
                        "answer (the gold answer's first token), subject (the pictured subject's first token, the "
                        "recognition hop), first-token (the first generated token at the prompt's last token), auto "
                        "(default: subject when the model's prefix names the subject, else answer; per question)")
    parser.add_argument("--band-ks", default=(1, 2, 3), type=k_list, metavar="K,K,...",
                        help="image tokens cut per layer band in the banded knockout (default 1,2,3)")
    parser.add_argument("--bands", type=positive_int, default=3, help="layer bands for the banded knockout (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-revision", default=None, help="dataset revision on the Hub")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help="tokens of the greedy answer scored right or wrong (16; flag-llava's sentences need 24)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_attention)


@distributed.data_parallel("attention")  # torchrun / accelerate launch: one shard per rank
def run_attention(args: argparse.Namespace) -> int:
    from harness.outputs import StaleDocuments, check_out

    check_out(args.out, "attention", args.model, args.data)  # before any work: the one --out rule
    with StaleDocuments(args.out, "attention"):
        return _run_attention(args)


def _run_attention(args: argparse.Namespace) -> int:
    from harness.models.loading import load_model
    from harness.shards import parse_shard
    from harness.tracing.attention_study import StudyOptions, run_attention_study
    from harness.tracing.summaries import print_attention_summary
    from vqa_constraints.loading import load_split

    parse_shard(args.shard)  # a malformed --shard fails before the model loads
    split = load_split(args.data, args.config, args.split, revision=args.data_revision)
    adapter = load_model(args.model, **model_options(args))  # --dtype --device --device-map --max-pixels ...
    check_sizes(adapter, split, max(args.top_k, *args.band_ks), args.n_layers)
    options = options_from_args(StudyOptions, args, progress=not args.no_progress)
    stats = run_attention_study(adapter, split, args.out, options, dtype=args.dtype)
    print_attention_summary(stats, args.out)
    return 0


def check_sizes(adapter, split, top_k: int, n_layers: int) -> None:
    """Options the model bounds: more layers or image tokens than it has would silently mean "all of them"."""
    if n_layers > adapter.num_layers:
        raise UserError(f"--layers-for-auroc {n_layers}: the model has only {adapter.num_layers} layers")
    if not len(split) or not getattr(adapter, "is_multimodal", True):
        return  # nothing to analyse, or a text model, which run_attention_study refuses
    record = split.record(0)
    count = len(adapter.encode(record.question, record.image).image_positions)
    if top_k > count:
        raise UserError(f"--top-k/--band-ks {top_k}: the model sees {count} image tokens for an image "
                        f"(question {record.id}); choose at most {count}")


def k_list(text: str) -> tuple[int, ...]:
    """``type=`` for --band-ks: "1,2,3" -> (1, 2, 3)."""
    try:
        ks = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be at least 1")
    return ks


def layer_list(text: str) -> tuple[int, ...]:
    """``type=`` for --knockout-layers: "2-5" -> (2, 3, 4, 5); "0,3" -> (0, 3)."""
    try:
        if "-" in text:
            start, end = (int(part) for part in text.split("-", 1))
            layers = tuple(range(start, end + 1))
        else:
            layers = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B or a comma-separated list of layer numbers, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer")
    return layers

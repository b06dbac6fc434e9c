"""`vqa-constraints attention`: attention contributions, knockout and failure prediction for one split."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import distributed
from harness.commands import shard
from harness.models.loading import add_model_arguments
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
    from harness.models.loading import load_model, model_options
    from harness.shards import parse_shard
    from harness.tracing.attention_study import StudyOptions, run_attention_study
    from vqa_constraints.loading import load_split

    parse_shard(args.shard)  # a malformed --shard fails before the model loads
    split = load_split(args.data, args.config, args.split, revision=args.data_revision)
    adapter = load_model(args.model, **model_options(args))  # --dtype --device --device-map --max-pixels ...
    check_sizes(adapter, split, max(args.top_k, *args.band_ks), args.n_layers)
    options = StudyOptions(top_k=args.top_k, draws=args.draws, seed=args.seed, n_layers=args.n_layers,
                           limit=args.limit, knockout_layers=args.knockout_layers, progress=not args.no_progress,
                           shard=args.shard, max_new_tokens=args.max_new_tokens, target=args.target,
                           band_ks=args.band_ks, bands=args.bands)
    stats = run_attention_study(adapter, split, args.out, options, dtype=args.dtype)
    print_summary(stats, args.out)
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


def _fmt(cell: dict | None) -> str:
    if not cell or cell.get("value") is None:
        return "–"
    return f"{cell['value']:.3g} [{cell['ci_low']:.3g}, {cell['ci_high']:.3g}]"


def _mean(cell: dict | None) -> str:
    return "–" if not cell or cell.get("value") is None else f"{cell['value']:.3f}"


def print_summary(stats: dict, out: Path) -> None:
    """Rich tables: per-layer contributions, knockout, AUROCs."""
    from rich.console import Console
    from rich.table import Table

    import sys

    console = Console(width=None if sys.stdout.isatty() else 120)
    counts = stats["counts"]
    console.print(
        f"[bold]{stats['model']}[/] on {stats['config']}/{stats['split']}: {counts['analysed']} of "
        f"{counts['questions']} questions analysed, {counts['correct']} answered correctly"
        + (f", skipped {counts['skipped']}" if counts["skipped"] else "")
    )
    layers = Table(title="mean contribution per layer (95% CI), all analysed questions; 'last' = where the model "
                   "predicts its answer entity, 'target' = where the knockout's token is predicted")
    layers.add_column("layer", justify="right")
    names = [name for name in stats["per_layer"] if not name.endswith("_share")]
    for name in names:
        layers.add_column(name.replace("_", " "))
    columns = [stats["per_layer"][name]["all"] for name in names]
    for layer in range(stats["num_layers"]):
        layers.add_row(str(layer), *(_fmt(col[layer]) if layer < len(col) else "–" for col in columns))
    console.print(layers)
    knock = Table(title=f"knockout of k={stats['options']['top_k']} image tokens: mean p(answer), correct answers "
                  "(95% CIs in attention_stats.json)")
    for column in ("target", "n", "clean", "top-k cut", "random-k cut", "drop top-k", "drop random-k", "top ≥ random"):
        knock.add_column(column, no_wrap=True)
    for target, result in stats["knockout"].items():
        share = result["share_top_hurts_at_least_as_much"]
        knock.add_row(target, str(result["n"]), _mean(result["p_clean"]), _mean(result["p_top"]),
                      _mean(result["p_random"]), _mean(result["drop_top"]), _mean(result["drop_random"]),
                      "–" if share is None else f"{share:.0%}")
    console.print(knock)
    f2 = stats["finding_2"]
    bands = Table(title=f"image -> constraint cut per layer band, target {f2['target']}: paired drop(top-k) - "
                  f"drop(random-k) per question, mean [95% CI]")
    for column in ("layers", "k", "n", "drop top-k", "drop random-k", "difference"):
        bands.add_column(column, no_wrap=True)
    for cell in f2["bands"]:
        diff = "–" if cell["difference"] is None else (f"{cell['difference']:.3g} "
                                                       f"[{cell['ci_low']:.3g}, {cell['ci_high']:.3g}]")
        bands.add_row(f"{cell['band'][0]}-{cell['band'][1]}", str(cell["k"]), str(cell["n"]),
                      "–" if cell["drop_top"] is None else f"{cell['drop_top']:.3f}",
                      "–" if cell["drop_random"] is None else f"{cell['drop_random']:.3f}", diff)
    console.print(bands)
    console.print(f"finding 2 rule (k={f2['k']}): {f2['verdict']} ({f2['reason']})")
    fp = stats["failure_prediction"]
    if fp:
        show = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        console.print(
            f"failure prediction on {fp['evaluation_n']} held-out questions ({fp['evaluation_n_correct']} correct): "
            f"AUROC constraint→answer entity (layers {fp['selected_layers']}) {show(fp['auroc_contribution'])}, "
            f"confidence {show(fp['auroc_confidence'])}" + (f" ({fp['note']})" if fp["note"] else "")
        )
    console.print(f"wrote {out}/attention_stats.json, attention_examples.parquet and PNG plots")

"""Console summaries of a finished trace (trace_stats.json) and attention study (attention_stats.json).

The commands print them after a run, and `merge` and a launched job's rank 0 after merging shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_trace_summary(document: dict) -> None:
    """One table row per (corrupted, target, kind) over all constraint counts."""
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
        if g["null"]:  # too few affected questions: no curve, no peak
            table.add_row(g["corrupted"], g["target"], g["kind"], str(g["n"]), str(g["n_affected"]),
                          f"{g['mean_p_clean']:.3f}", f"{g['mean_p_corrupt']:.3f}", "null", "null", "null")
            continue
        peak = g["mean_normalised"][g["peak_layer"]]
        self_restoring = " (restores the corrupted token itself)" if g["peak_layer"] in g["restores_corrupted_layers"] else ""
        table.add_row(g["corrupted"], g["target"], g["kind"], str(g["n"]), str(g["n_affected"]),
                      f"{g['mean_p_clean']:.3f}", f"{g['mean_p_corrupt']:.3f}", f"{g['peak_layer']}{self_restoring}",
                      "-" if peak is None else f"{peak:.3f}", ",".join(map(str, g["causal_layers"])) or "-")
    Console().print(table)
    if document.get("peak_mlp_layer") is not None:
        Console().print(f"peak causal MLP layer: {document['peak_mlp_layer']}")


def _fmt(cell: dict | None) -> str:
    if not cell or cell.get("value") is None:
        return "–"
    return f"{cell['value']:.3g} [{cell['ci_low']:.3g}, {cell['ci_high']:.3g}]"


def _mean(cell: dict | None) -> str:
    return "–" if not cell or cell.get("value") is None else f"{cell['value']:.3f}"


def print_attention_summary(stats: dict, out: Path) -> None:
    """Rich tables: per-layer contributions, knockout, AUROCs."""
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
    route = Table(title=f"the route: every image token cut from the constraint tokens per layer band, target "
                  f"{f2['target']}: share of p(target) lost per question, mean [95% CI]")
    for column in ("layers", "n", "drop", "share of p lost"):
        route.add_column(column, no_wrap=True)
    for cell in f2["route"]:
        share = "–" if cell["share"] is None else (f"{cell['share']:.3f} "
                                                    f"[{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]")
        route.add_row(f"{cell['band'][0]}-{cell['band'][1]}", str(cell["n"]),
                      "–" if cell["drop"] is None else f"{cell['drop']:.3f}", share)
    console.print(route)
    console.print(f"finding 2 rule (the route, margin {f2['margin']:.0%} of p): {f2['verdict']} ({f2['reason']})")
    fp = stats["failure_prediction"]
    if fp:
        show = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        console.print(
            f"failure prediction on {fp['evaluation_n']} held-out questions ({fp['evaluation_n_correct']} correct): "
            f"AUROC constraint→answer entity (layers {fp['selected_layers']}) {show(fp['auroc_contribution'])}, "
            f"confidence {show(fp['auroc_confidence'])}" + (f" ({fp['note']})" if fp["note"] else "")
        )
    console.print(f"wrote {out}/attention_stats.json, attention_examples.parquet and PNG plots")

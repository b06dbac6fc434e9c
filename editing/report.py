"""The human-readable outputs of an editing run: a markdown table and the layer-sweep plot."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from vqa_constraints.files import atomic_path, write_text_atomic

COLUMNS = [
    ("efficacy_score", "Efficacy score"),
    ("efficacy_magnitude", "Efficacy magnitude"),
    ("efficacy", "Efficacy (generated)"),
    ("generalization_score", "Generalization score"),
    ("generalization", "Generalization (generated)"),
    ("neighborhood", "Neighbourhood"),
    ("same_subject", "Same subject"),
    ("specificity", "Specificity"),
    ("locality", "Locality"),
    ("subject_kept", "Subject kept"),
]


def _cell(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def _number(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(document: dict) -> str:
    """Methods side by side: the harmonic-mean headline and every component with 95% intervals (subjects
    resampled), cost, the paired comparisons and the choices made on the validation split."""
    model = document["model"]["name_or_path"]
    data = document["data"]
    lines = [
        f"Editing on `{Path(model).name}` — track **{document['options']['track']}** "
        f"({data['config']}/{data['split']}), layers {document['layers']} ({document['layer_source']}), "
        f"key position {document['key_position']} ({document['key_position_source']}), "
        f"{document['requests']} requests about {document.get('subjects', '?')} subjects, "
        f"batch {document['options']['batch_edits']}.",
        "",
        "| Method | Edits | Score (harmonic) | Mean (arithmetic) | " + " | ".join(title for _, title in COLUMNS)
        + " | s / edit | Peak MB | Skipped |",
        "|---|---:|---|---|" + "---|" * len(COLUMNS) + "---:|---:|---:|",
    ]
    for name, summary in document["methods"].items():
        lines.append(
            f"| {name} | {summary['edits']} | {_cell(summary.get('score_ci'))} | "
            f"{_cell(summary.get('score_arithmetic_ci'))} | "
            + " | ".join(_cell(summary.get(key)) for key, _ in COLUMNS)
            + f" | {_number(summary.get('seconds_per_edit'), '.3f')} | {_number(summary.get('peak_memory_mb'), '.0f')}"
            + f" | {summary['skipped']} |"
        )
    lines += ["", "Score = harmonic mean of efficacy score, generalization score and specificity (mean of "
              "neighbourhood and same subject); intervals: 95% bootstrap resampling subjects."]
    if document.get("comparisons"):
        lines += ["", "| MultEdit variant | Baseline | Δ score (paired) | 95% interval | Edits | Subjects | Verdict |",
                  "|---|---|---:|---|---:|---:|---|"]
        for c in document["comparisons"]:
            interval = "–" if c["ci_low"] is None else f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
            lines.append(f"| {c['method']} | {c['baseline']} | {_number(c['difference'], '+.3f')} | {interval} "
                         f"| {c['n_edits']} | {c['n_subjects']} | {c['verdict']} |")
    for name, summary in document["methods"].items():
        bound = summary.get("linf_bound")
        if bound is not None:
            lines.append("")
            relative = f" ({bound['linf_rms']:g} × weight RMS)" if bound.get("linf_rms") is not None else ""
            lines.append(f"{name}: L∞ bound {bound['linf']:.3g}{relative} " + (
                "never bound (it equals FT here)" if bound["never_bound"]
                else f"clipped a step on {bound['edits_where_active']} of {bound['edit_operations']} edit operations"
            ) + ".")
    choices = document.get("choices") or {}
    for name, params in (choices.get("parameters") or {}).items():
        for param, chosen in params.items():
            grid = ", ".join(f"{value}: {_number(cell['score'], '.3f')}" for value, cell in chosen["grid"].items())
            lines += ["", f"{name}.{param} = {chosen['chosen']:g}, tuned on {choices['requests']} "
                      f"{choices['split']} requests (score by value: {grid})."]
    if document.get("sweep"):
        lines += ["", "Efficacy score by edited layer (one edit at a time):", ""]
        for name, rows in document["sweep"].items():
            lines.append(f"- {name}: " + ", ".join(
                f"L{row['layer']} {_number(row['efficacy_score']['mean'], '.2f')}" for row in rows))
    return "\n".join(lines) + "\n"


def write_table(document: dict, path: Path) -> None:
    write_text_atomic(Path(path), table(document))


def write_sweep_plot(document: dict, path: Path) -> None:
    """Efficacy (and generalization, dashed) against the edited layer, one line per method."""
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for name, rows in document["sweep"].items():
        layers = [row["layer"] for row in rows]
        efficacy = [row["efficacy"]["mean"] for row in rows]
        line, = axis.plot(layers, efficacy, marker="o", label=f"{name} efficacy")
        general = [row["generalization"]["mean"] for row in rows]
        if any(value is not None for value in general):
            axis.plot(layers, general, linestyle="--", color=line.get_color(), label=f"{name} generalization")
    for layer in document["layers"]:
        axis.axvline(layer, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("edited layer")
    axis.set_ylabel("fraction of edits")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"Editing by layer: {Path(document['model']['name_or_path']).name}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(Path(path)) as tmp:
        # No metadata, so the same numbers give the same bytes.
        figure.savefig(tmp, dpi=120, metadata={"Software": None})

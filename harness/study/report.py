"""Write ``report.md`` for a demo folder from the run folders' own result files.

The report reads only files (results.json, trace_stats.json,
attention_stats.json, editing_results.json): every number in it is copied
from one of them, and each table names the file it came from. Figures made
here combine several runs (MLLM vs text-only, visual vs textual constraints);
the others are linked from the run folders where they were written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.figure import Figure

from harness.outputs import read_complete
from harness.study.controls import CONTROLS_FILE, control_verdicts
from harness.study.findings import findings_section
from vqa_constraints.files import atomic_path, write_text_atomic

REPORT_NAME = "report.md"
FIGURES = "figures"


def fmt(value, digits: int = 3) -> str:
    """How every number in the report is printed (the tests format the same way)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_ci(cell: dict | None, key: str = "value") -> str:
    if not cell or cell.get(key) is None:
        return "–"
    return f"{fmt(cell[key])} [{fmt(cell['ci_low'])}, {fmt(cell['ci_high'])}]"


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def load_complete(path: Path) -> dict | None:
    """A trace/attention/editing document, None when absent; UserError when it is partial (interrupted)."""
    return read_complete(path) if path.exists() else None


def rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def image_link(alt: str, path: Path, root: Path) -> str:
    """A markdown image, linked relative to the report's folder."""
    return f"![{alt}]({rel(path, root)})"


def source_line(path: Path, root: Path, details: str) -> str:
    """The line above a table that names the file its numbers come from."""
    return f"Source: `{rel(path, root)}` — {details}"


def table_head(*columns: str) -> list[str]:
    """A markdown table's header row and the separator row under it."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


# --- sections -----------------------------------------------------------------


def accuracy_section(name: str, run: Path, root: Path) -> list[str]:
    results = load_json(run / "results.json")
    if results is None:
        return [f"_No evaluation for {name}._", ""]
    metrics = results["metrics"]
    configs = [c for c in results["dataset"]["configs"] if c in metrics]
    lines = [
        source_line(run / "results.json", root, f"model revision `{results['model']['revision']}`, "
                    f"dtype {results['model']['dtype']}, {results['n']} questions."),
        "",
        *table_head("config", "n", "accuracy [95% CI]", "exact match", "visual only", "visual+textual"),
    ]
    for config in configs:
        cell = metrics[config]
        by_type = cell.get("by", {}).get("constraint_types", {})
        lines.append(
            f"| {config} | {cell['n']} | {fmt_ci(cell.get('accuracy'))} | {fmt_ci(cell.get('exact_match'))} "
            f"| {fmt_ci(by_type.get('visual', {}).get('accuracy'))} "
            f"| {fmt_ci(by_type.get('visual+textual', {}).get('accuracy'))} |"
        )
    figure = root / FIGURES / f"{name}-accuracy.png"
    plot_accuracy(metrics, configs, figure, title=f"{name}: accuracy per config and constraint type")
    lines += ["", image_link("accuracy", figure, root), ""]
    return lines


def countries_section(name: str, runs: Path, root: Path) -> list[str]:
    """A tuned model's accuracy and MLLM trace on its held-out countries (what the findings are judged on) beside
    the same runs on its training countries ("-training" folders)."""
    lines = ["The same evaluate and MLLM trace (window 1) on the countries the model was tuned on; the findings "
             "are judged on the held-out ones only.", "",
             *table_head("countries", "single_constraint accuracy [95% CI]", "n", "traced of questions",
                         "affected", "p clean", "p corrupt", "peak MLP layer (restored at)")]
    sources = []
    for label, suffix in (("held-out", ""), ("training", "-training")):
        evaluation = runs / f"{name}-evaluate{suffix}" / "results.json"
        trace_file = runs / f"{name}-trace-mllm{suffix}" / "trace_stats.json"
        results, trace = load_json(evaluation), load_complete(trace_file)
        cell = (results or {}).get("metrics", {}).get("single_constraint", {})
        accuracy = [fmt_ci(cell.get("accuracy")), str(cell.get("n", "–"))]
        if trace is None:
            lines.append(f"| {label} | " + " | ".join(accuracy) + " | – | – | – | – | – |")
        else:
            group = trace_groups(trace, "mlp")[0]
            peak_group = trace.get("peak_mlp_group") or {}
            where = (f" ({peak_group['target']})" if trace["peak_mlp_layer"] is not None
                     and isinstance(peak_group, dict) and "target" in peak_group else "")
            lines.append(
                f"| {label} | " + " | ".join(accuracy) + f" | {trace['counts']['traced']} of "
                f"{trace['counts']['records']} | {group['n_affected']} | {fmt(group['mean_p_clean'])} "
                f"| {fmt(group['mean_p_corrupt'])} | {fmt(trace['peak_mlp_layer'])}{where} |")
        sources += [f"`{rel(path, root)}`" for path in (evaluation, trace_file) if path.exists()]
    return lines + ["", "Sources: " + ", ".join(sources) + ".", ""]


def trace_groups(stats: dict, kind: str) -> list[dict]:
    return [g for g in stats["groups"] if g["kind"] == kind and g["num_constraints"] == "all"]


def trace_section(name: str, runs: Path, root: Path, planted_layer: int | None) -> list[str]:
    lines: list[str] = []
    traces = {
        "MLLM (with image)": runs / f"{name}-trace-mllm",
        "MLLM, subject target (recognition)": runs / f"{name}-trace-mllm-subject",
        "text-only LLM": runs / f"{name}-trace-text-only",
        "multi-constraint": runs / f"{name}-trace-multi",
        "multi-constraint, image corrupted": runs / f"{name}-trace-multi-image",
    }
    documents = {label: load_complete(folder / "trace_stats.json") for label, folder in traces.items()}
    if planted_layer is not None:
        lines += [f"Ground truth: the facts were planted in MLP layer **{planted_layer}**.", ""]
    lines += ["Curves, peaks and causal layers are over the **affected** questions only (the corruption at least "
              "halves p_clean); a group with too few of them is *null*. *self*: a layer-0 restoration at a "
              "corrupted position, which restores the corrupted token itself.", ""]
    lines += table_head("trace", "corrupted", "restored at", "kind", "n traced", "n affected", "p clean", "p corrupt",
                        "peak layer", "Σeffect/Σgap at peak", "causal layers", "peak agreement")
    for label, document in documents.items():
        if document is None:
            continue
        for group in document["groups"]:
            if group["num_constraints"] != "all":
                continue
            lines.append(
                f"| {label} | {group['corrupted']} | {group['target']} | {group['kind']} | {group['n']} "
                f"| {group['n_affected']} | {fmt(group['mean_p_clean'])} | {fmt(group['mean_p_corrupt'])} "
                + trace_peak_cells(group)
            )
    lines.append("")
    for label, folder in traces.items():
        document = documents[label]
        if document is None:
            continue
        counts = document["counts"]
        lines.append(
            f"- {label}: `{rel(folder / 'trace_stats.json', root)}` — corruption `{document['options']['corruption']}`, "
            f"{counts['traced']} of {counts['records']} questions traced "
            f"({counts['skipped']['wrong_answer']} answered wrong, skipped), target "
            f"`{document.get('target', {}).get('mode', 'first-token')}`, peak MLP layer "
            f"{fmt(document['peak_mlp_layer'])}."
        )
        for png in sorted(folder.glob("*.png")):
            if png.name.startswith(("heatmap_", "curve_")):
                lines.append(f"\n  {image_link(f'{label} {png.stem}', png, root)}")
    lines.append("")
    comparisons = [
        ("MLLM vs text-only LLM (MLP restoration)",
         [("MLLM", documents["MLLM (with image)"]), ("text-only", documents["text-only LLM"])]),
        ("visual vs textual constraints (MLP restoration, multi-constraint questions)",
         [("", documents["multi-constraint"])]),
    ]
    for index, (title, sources) in enumerate(comparisons):
        curves = comparison_curves(sources)
        if not curves:
            continue
        figure = root / FIGURES / f"{name}-trace-comparison-{index}.png"
        plot_curves(curves, figure, title=f"{name}: {title}", planted_layer=planted_layer)
        lines += [image_link(title, figure, root), ""]
    return lines


def trace_peak_cells(group: dict) -> str:
    """The peak layer, Σeffect/Σgap there, causal layers and peak agreement cells of one group's row."""
    if group["null"]:
        return "| null | null | null | null |"
    peak = group["peak_layer"]
    self_restoring = " (self)" if peak in group["restores_corrupted_layers"] else ""
    return (f"| {peak}{self_restoring} | {fmt(group['effect_over_gap'][peak])} "
            f"| {', '.join(f'{l} (self)' if l in group['restores_corrupted_layers'] else str(l) for l in group['causal_layers']) or '–'} "
            f"| {fmt(group['peak_agreement_affected'])} |")


def comparison_curves(sources) -> dict[str, list]:
    """label (with n affected) -> mean normalised MLP effect per layer, one curve per (run, group);
    a null group (too few affected questions) is never drawn."""
    curves = {}
    for label, document in sources:
        if document is None:
            continue
        for group in trace_groups(document, "mlp"):
            if group["null"]:
                continue
            key = f"{group['corrupted']} → {group['target']} (n={group['n_affected']})"
            curves[f"{label}: {key}" if label else key] = group["mean_normalised"]
    return curves


def attention_section(name: str, run: Path, root: Path) -> list[str]:
    stats = load_complete(run / "attention_stats.json")
    if stats is None:
        return [f"_No attention analysis for {name}._", ""]
    counts = stats["counts"]
    lines = [
        source_line(run / "attention_stats.json", root,
                    f"{counts['analysed']} questions analysed, {counts['correct']} answered correctly."),
        "",
        *table_head("knockout target", "n", "k", "p clean", "p after top-k blocked", "p after random k blocked",
                    "drop (top-k)", "drop (random)"),
    ]
    for target, knockout in stats["knockout"].items():
        lines.append(
            f"| {target} | {knockout['n']} | {knockout['k']} | {fmt_ci(knockout['p_clean'])} | {fmt_ci(knockout['p_top'])} "
            f"| {fmt_ci(knockout['p_random'])} | {fmt_ci(knockout['drop_top'])} | {fmt_ci(knockout['drop_random'])} |"
        )
    prediction = stats.get("failure_prediction")
    if prediction:
        lines += [
            "",
            f"Failure prediction (AUROC, {prediction['evaluation_n']} held-out questions): constraint→last-token "
            f"contribution over layers {prediction['selected_layers']}: {fmt(prediction['auroc_contribution'])}; "
            f"model confidence: {fmt(prediction['auroc_confidence'])}.",
        ]
    lines.append("")
    for png in ("image_to_constraint.png", "constraint_to_last.png"):
        if (run / png).exists():
            lines += [image_link(png[:-4], run / png, root), ""]
    return lines


def editing_section(name: str, run: Path, sweep_run: Path, root: Path) -> list[str]:
    results = load_complete(run / "editing_results.json")
    if results is None:
        return [f"_No editing run for {name}._", ""]
    options = results["options"]
    lines = [
        source_line(run / "editing_results.json", root,
                    f"track `{options['track']}`, key position `{results.get('key_position', options['key_position'])}`"
                    f" ({results.get('key_position_source', 'option')}), layers "
                    f"{results['layers']} ({results['layer_source']}), {results['requests']} edit requests, "
                    f"{results['specificity_questions']} specificity questions."),
        "",
        *table_head("method", "edits", "efficacy", "generalization", "subject kept", "specificity", "locality",
                    "neighborhood", "log-prob gain", "mean score", "s / edit", "peak memory (MB)"),
    ]
    for method, cell in results["methods"].items():
        lines.append(
            f"| {method} | {cell['edits']} | {fmt_stat(cell['efficacy'])} | {fmt_stat(cell['generalization'])} "
            f"| {fmt_stat(cell.get('subject_kept'))} | {fmt_stat(cell['specificity'])} "
            f"| {fmt_stat(cell.get('locality'))} "
            f"| {fmt_stat(cell.get('neighborhood'))} | {fmt_stat(cell['logprob_gain'])} | {fmt(cell['score'])} "
            f"| {fmt(cell['seconds_per_edit'], 2)} | {fmt(cell['peak_memory_mb'], 1)} |"
        )
    lines.append("")
    sweep_results = load_complete(sweep_run / "editing_results.json")
    if sweep_results and sweep_results.get("sweep"):
        lines.append(f"Layer sweep: `{rel(sweep_run / 'editing_results.json', root)}`.")
        lines.append("")
        lines += table_head("method", "layer", "efficacy", "generalization", "specificity", "mean score")
        for method, rows in sweep_results["sweep"].items():
            for row in rows:
                lines.append(f"| {method} | {row['layer']} | {fmt_stat(row['efficacy'])} "
                             f"| {fmt_stat(row['generalization'])} | {fmt_stat(row['specificity'])} "
                             f"| {fmt(row['score'])} |")
        lines.append("")
    plot = sweep_run / "efficacy_by_layer.png"
    if plot.exists():
        lines += [image_link("efficacy by edited layer", plot, root), ""]
    return lines


def fmt_stat(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{fmt(stat['mean'])} [{fmt(stat['ci_low'])}, {fmt(stat['ci_high'])}]"


# --- figures ------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # No timestamp in the PNG metadata, so the same numbers give the same file.
        fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})


def plot_accuracy(metrics: dict, configs: list[str], path: Path, title: str) -> None:
    groups = ["all", "visual", "visual+textual"]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for offset, group in enumerate(groups):
        values, errors = [], [[], []]
        for config in configs:
            cell = metrics[config] if group == "all" else metrics[config].get("by", {}).get(
                "constraint_types", {}).get(group, {})
            accuracy = cell.get("accuracy") or {}
            value = accuracy.get("value")
            values.append(value if value is not None else 0.0)
            errors[0].append(value - accuracy["ci_low"] if value is not None else 0.0)
            errors[1].append(accuracy["ci_high"] - value if value is not None else 0.0)
        positions = [i + (offset - 1) * width for i in range(len(configs))]
        ax.bar(positions, values, width, yerr=errors, capsize=3, label=group)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_curves(curves: dict[str, list], path: Path, title: str, planted_layer: int | None) -> None:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(range(len(curve)), [v if v is not None else float("nan") for v in curve], marker="o", label=label)
    if planted_layer is not None:
        ax.axvline(planted_layer, color="grey", linestyle="--", label=f"planted layer {planted_layer}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean normalised indirect effect")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


# --- the report ---------------------------------------------------------------


def dataset_of(run: Path) -> Path | None:
    """The dataset folder an evaluate run scored, from its results.json."""
    results = load_json(run / "results.json")
    path = (results or {}).get("dataset", {}).get("data")
    return Path(path) if path else None


def write_report(out: Path, models: dict[str, str], steps=(), quick: bool = False) -> Path:
    out = Path(out)
    runs = out / "runs"
    lines = [
        "# VQA-Constraints study report",
        "",
        f"Made by `vqa-constraints demo{' --quick' if quick else ''}`. Every number below is copied from the run "
        "file named above its table; rerunning the demo reuses finished runs.",
        "",
    ]
    # The learned model first, then the planted one (the tools' ground-truth check).
    ordered = sorted(models, key=lambda name: name == "planted")
    lines += ["## The paper's findings, tested", "",
              "Each finding as the paper states it, the rule that decides it here, and the verdict on each model "
              "with the numbers (95% intervals, n). The flag models are judged on their held-out countries; each "
              "one's section gives its training countries beside them.", "",
              *findings_section(runs, ordered, controls=control_verdicts(out / "controls" / CONTROLS_FILE) or None)]
    for name, model_dir in models.items():
        planted_layer = load_json(Path(model_dir) / "config.json").get("planted_layer")
        lines += [f"## Model: {name}", "", f"Checkpoint: `{model_dir}`.", ""]
        data = dataset_of(runs / f"{name}-evaluate")
        if data:
            lines += [f"Questions: the `{data.name}` build in `{rel(data, out)}` (see its `build_info.json`).", ""]
        lines += ["### Accuracy", ""] + accuracy_section(name, runs / f"{name}-evaluate", out)
        if (runs / f"{name}-evaluate-training").exists():
            lines += ["### Held-out and training countries", ""] + countries_section(name, runs, out)
        lines += ["### Causal traces", ""] + trace_section(name, runs, out, planted_layer)
        lines += ["### Attention contributions", ""] + attention_section(name, runs / f"{name}-attention", out)
        lines += ["### Editing", ""] + editing_section(name, runs / f"{name}-edit", runs / f"{name}-edit-sweep", out)
        if (runs / f"{name}-edit-insertion").exists():
            lines += ["#### Insertion track", ""] + editing_section(name, runs / f"{name}-edit-insertion", runs / "-", out)
    if steps:
        lines += ["## Steps", "", *table_head("step", "command", "time")]
        for step in steps:
            when = "reused" if step.reused else (f"{step.seconds:.1f} s" if step.seconds is not None else "")
            lines.append(f"| {step.name} | `vqa-constraints {' '.join(step.argv[:1])} …` | {when} |")
        lines.append("")
    path = out / REPORT_NAME
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path

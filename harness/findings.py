"""The paper's findings put to the test on each demo model: one row per finding, a verdict, and the numbers.

Reads the demo's run folders (trace, attention, edit outputs; complete ones only) and writes, per finding,
``holds`` / ``does not hold`` / ``inconclusive`` with the evidence: every number with its 95% interval and
its n. A verdict is inconclusive whenever the measurement it needs is null (too few affected questions, no
causal layer, no wrong answers, a missing run), never guessed. The rules are stated beside each finding in ``FINDINGS``.
"""

from __future__ import annotations

from pathlib import Path

from harness.outputs import is_complete, read_complete
from harness.tracing.stats import group_names

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
MIN_CLASS = 5  # fewer right (or wrong) answers than this in the AUROC's evaluation half: inconclusive

# (number, question, the paper's claim, our rule)
FINDINGS = [
    ("1", "Where is the fact retrieved?",
     "causal MLP layers are early in the MLLM (LLaVA: 1–4), later in the text-only LLM (Vicuna: 4–7)",
     "holds if the MLLM's peak MLP layer (restoring the constraint's last token) is below the text-only one's"),
    ("2", "Do the constraint tokens carry the image's information?",
     "information flows image → constraint tokens in early layers",
     "holds if image→constraint attention contributions peak in the first half of the layers and blocking the "
     "top image tokens' attention to the constraint lowers p more than blocking random ones (95% intervals apart)"),
    ("3", "Multi-constraint questions: visual vs textual constraint",
     "both kinds of constraint are retrieved through early causal layers",
     "holds if both groups' peak MLP layers are in the first half of the layers"),
    ("4", "Can failure be predicted?",
     "the constraint→last-token attention contribution predicts a wrong answer",
     f"holds if its AUROC's 95% interval is above 0.5 (held-out half, ≥ {MIN_CLASS} right and wrong answers)"),
    ("5", "Editing the causal layer",
     "MultEdit at the causal layer corrects and inserts facts better than fine-tuning",
     "holds if MultEdit's mean of efficacy, generalization and specificity beats FT's and FT-L's on every "
     "track run"),
]


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else (str(value) if isinstance(value, int) else f"{value:.{digits}f}")


def fmt_interval(value, low, high) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def load(path: Path) -> dict | None:
    """A complete output document, or None (missing, partial or unreadable: not evidence)."""
    return read_complete(path) if is_complete(path) else None


def find_group(stats: dict | None, kind: str, preferences) -> dict | None:
    """The first (corrupted, target) group of ``kind`` over all constraint counts, in preference order, that has a
    causal layer; else the first that is not null; else None."""
    if stats is None:
        return None
    measured = []
    for corrupted, target in preferences:
        accepted, name = group_names(corrupted, target)
        for wanted in accepted:
            for group in stats["groups"]:
                if (group["kind"], group["num_constraints"], group["corrupted"], group["target"]) == (kind, "all", wanted, name):
                    if not group["null"]:
                        measured.append(group)
    # A group with a causal layer first; else the first measured one, so the evidence says what was seen.
    return next((g for g in measured if g["causal_layers"]), measured[0] if measured else None)


def has_causal_layer(group: dict | None) -> bool:
    """A measured group whose effect crosses the trace's threshold somewhere: its peak is a retrieval layer."""
    return group is not None and bool(group["causal_layers"])


def describe_peak(label: str, group: dict | None) -> str:
    if group is None:
        return f"{label}: null (no group with enough affected questions)"
    peak = group["peak_layer"]
    if not group["causal_layers"]:
        return (f"{label}: no causal MLP layer ({group['corrupted']} → {group['target']}; largest effect "
                f"{fmt_interval(group['mean_effect'][peak], group['ci_low'][peak], group['ci_high'][peak])} at layer "
                f"{peak}, below the threshold; n = {group['n_affected']} affected of {group['n']})")
    return (f"{label}: peak MLP layer {peak} ({group['corrupted']} → {group['target']}; effect "
            f"{fmt_interval(group['mean_effect'][peak], group['ci_low'][peak], group['ci_high'][peak])}, "
            f"n = {group['n_affected']} affected of {group['n']}), causal layers "
            f"{', '.join(map(str, group['causal_layers'])) or '–'}")


PEAK_PREFERENCES = (("visual", "constraint_last"), ("textual", "constraint_last"), ("image", "last"),
                    ("visual", "last"))


def where_retrieved(runs: Path, name: str) -> tuple[str, str]:
    mllm = find_group(load(runs / f"{name}-trace-mllm" / "trace_stats.json"), "mlp", PEAK_PREFERENCES)
    text = find_group(load(runs / f"{name}-trace-text-only" / "trace_stats.json"), "mlp", PEAK_PREFERENCES)
    evidence = f"{describe_peak('MLLM', mllm)}; {describe_peak('text-only', text)}"
    if not (has_causal_layer(mllm) and has_causal_layer(text)):
        return UNSURE, evidence
    return (HOLDS if mllm["peak_layer"] < text["peak_layer"] else FAILS), evidence


def constraint_carries_image(runs: Path, name: str) -> tuple[str, str]:
    stats = load(runs / f"{name}-attention" / "attention_stats.json")
    if stats is None:
        return UNSURE, "no attention run"
    layers = stats["per_layer"]["image_to_visual_constraint"]["all"]
    knockout = stats["knockout"]["constraint"]
    if not layers or not knockout["n"]:
        return UNSURE, "no question analysed"
    top = max(layers, key=lambda cell: -1e30 if cell["value"] is None else cell["value"])
    early = top["layer"] < len(layers) / 2
    drop_top, drop_random = knockout["drop_top"], knockout["drop_random"]
    evidence = (f"image→constraint contribution peaks at layer {top['layer']} of {len(layers)} "
                f"({fmt_interval(top['value'], top['ci_low'], top['ci_high'])}, n = {top['n']}); blocking the top "
                f"{knockout['k']} image tokens' attention to the constraint lowers p by "
                f"{fmt_interval(drop_top['value'], drop_top['ci_low'], drop_top['ci_high'])}, random ones by "
                f"{fmt_interval(drop_random['value'], drop_random['ci_low'], drop_random['ci_high'])} (n = {knockout['n']})")
    if None in (drop_top["ci_low"], drop_random["ci_high"]):
        return UNSURE, evidence
    apart = drop_top["ci_low"] > drop_random["ci_high"]
    if early and apart:
        return HOLDS, evidence
    overlapping = drop_top["ci_low"] <= drop_random["ci_high"] and drop_random["ci_low"] <= drop_top["ci_high"]
    return (UNSURE if early and overlapping else FAILS), evidence


def multi_constraint(runs: Path, name: str) -> tuple[str, str]:
    stats = load(runs / f"{name}-trace-multi" / "trace_stats.json")
    targets = ("constraint_last", "last")
    visual = find_group(stats, "mlp", [("visual", t) for t in targets])
    textual = find_group(stats, "mlp", [("textual", t) for t in targets])
    evidence = f"{describe_peak('visual', visual)}; {describe_peak('textual', textual)}"
    if not (has_causal_layer(visual) and has_causal_layer(textual)):
        return UNSURE, evidence
    half = len(visual["mean_effect"]) / 2
    return (HOLDS if visual["peak_layer"] < half and textual["peak_layer"] < half else FAILS), evidence


def failure_predictable(runs: Path, name: str) -> tuple[str, str]:
    stats = load(runs / f"{name}-attention" / "attention_stats.json")
    prediction = (stats or {}).get("failure_prediction")
    if not prediction:
        return UNSURE, "no attention run"
    n, right = prediction["evaluation_n"], prediction["evaluation_n_correct"]
    contribution = prediction.get("auroc_contribution_ci") or [None, None]
    confidence = prediction.get("auroc_confidence_ci") or [None, None]
    evidence = (f"AUROC of the contribution (layers {prediction['selected_layers']}) "
                f"{fmt_interval(prediction['auroc_contribution'], *contribution)}, of the model's confidence "
                f"{fmt_interval(prediction['auroc_confidence'], *confidence)}; held-out half n = {n} "
                f"({right} right, {n - right} wrong)")
    if min(right, n - right) < MIN_CLASS or contribution[0] is None:
        return UNSURE, evidence
    if contribution[0] > 0.5:
        return HOLDS, evidence
    return (FAILS if contribution[1] < 0.5 else UNSURE), evidence


def editing(runs: Path, name: str) -> tuple[str, str]:
    parts, verdicts = [], []
    for folder in sorted(runs.glob(f"{name}-edit*")):
        if folder.name.endswith("-sweep"):
            continue
        results = load(folder / "editing_results.json")
        if results is None or "multedit" not in results["methods"]:
            continue
        methods = results["methods"]
        scores = {m: cell["score"] for m, cell in methods.items()}
        best = {m: s for m, s in scores.items() if not m.startswith("multedit")}
        ours = max(s for m, s in scores.items() if m.startswith("multedit") and s is not None)
        efficacy = methods["multedit"]["efficacy"]
        parts.append(f"{results['options']['track']} (layer {results['layers']}, {results['requests']} edits): mean score "
                     + ", ".join(f"{m} {fmt(s)}" for m, s in scores.items())
                     + f"; MultEdit efficacy {fmt_interval(efficacy['mean'], efficacy['ci_low'], efficacy['ci_high'])}")
        if best:
            verdicts.append(ours > max(s for s in best.values() if s is not None))
    if not verdicts:
        return UNSURE, "; ".join(parts) or "no editing run"
    return (HOLDS if all(verdicts) else FAILS), "; ".join(parts)


TESTS = [where_retrieved, constraint_carries_image, multi_constraint, failure_predictable, editing]


def findings_section(runs: Path, models: list[str]) -> list[str]:
    """Markdown: one row per finding, one column per model (verdict and evidence)."""
    lines = ["| # | question | the paper's finding | rule | " + " | ".join(f"on {m}" for m in models) + " |",
             "|" + "---|" * (4 + len(models))]
    for (number, question, claim, rule), test in zip(FINDINGS, TESTS):
        cells = []
        for model in models:
            verdict, evidence = test(runs, model)
            cells.append(f"**{verdict}**: {evidence}".replace("|", "\\|"))
        lines.append(f"| {number} | {question} | {claim} | {rule} | " + " | ".join(cells) + " |")
    return lines + [""]

"""The paper's findings put to the test on each demo model: one row per finding, a verdict, and the numbers.

Reads the demo's run folders (trace, attention, edit outputs; complete ones only) and writes, per finding, one of

- ``holds`` / ``does not hold``: only when a 95% bootstrap interval excludes the other side;
- ``inconclusive``: the interval straddles it;
- ``not tested``: the measurement cannot see the effect on that model (too few affected or answered questions,
  no route from the corrupted input to the answer, a target read before the fact, a forced prefix that hands the
  corrupted run the subject, two sides measured differently), with the reason.

Every rule is a function of run folders, so the same rule is applied to the ground-truth controls
(``harness/study/controls.py``), where the right verdict is known, and to the models under study.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from harness.bootstrap import bootstrap_interval, keyed_rng
from harness.outputs import is_complete, read_complete
from harness.tracing.stats import AFFECTED_RATIO, group_names

HOLDS, FAILS, UNSURE, UNTESTED = "holds", "does not hold", "inconclusive", "not tested"
MIN_CLASS = 5  # fewer right (or wrong) answers than this in the AUROC's evaluation half: not tested
MIN_QUESTIONS = 5  # fewer questions with a measured effect than this on a side: not tested
# "Earlier" means by at least half a layer: a difference of centres of mass surely below that is no difference
# in where a fact is stored (two seeds of one planted model differ by less; see harness/study/controls.py).
MIN_LAYER_GAP = 0.5
RESAMPLES = 2000

# (number, question, the paper's claim, our rule)
FINDINGS = [
    ("1", "Where is the fact retrieved?",
     "causal MLP layers are early in the MLLM (LLaVA: 1–4), later in the text-only LLM (Vicuna: 4–7)",
     "per question, the centre of mass of the MLP restoration effect (self-restoring cells excluded) in the "
     "text-only trace minus the MLLM's, same corruption family, window and restored group on both sides; holds if "
     f"the 95% interval of the mean difference is above {MIN_LAYER_GAP} layer, does not hold if below it"),
    ("2", "Do the constraint tokens carry the image's information?",
     "information flows image → constraint tokens in early layers",
     "per layer band, every image token's attention to the visual-constraint tokens cut, share of p(target) "
     "lost (read where the target is predicted); holds if the earliest band whose 95% interval lies at or above "
     "20% of p ends in the first half of the layers, does not hold if it lies later or every first-half band's "
     "interval is below 20%"),
    ("3", "Multi-constraint questions: visual vs textual constraint",
     "both kinds of constraint are retrieved through early causal layers",
     "per question, the centre of mass of the MLP restoration effect for each constraint kind (textual: noise on "
     "its tokens; visual: noise on the image it refers to), same window; holds if both intervals lie in the first "
     "half of the layers, does not hold if either lies in the second half"),
    ("4", "Can failure be predicted?",
     "the constraint→target attention contribution predicts a wrong answer",
     f"AUROC on the held-out half, read where the answer entity is predicted; holds if its 95% interval is above "
     f"0.5, does not hold if below (≥ {MIN_CLASS} right and wrong answers)"),
    ("5", "Editing the causal layer",
     "MultEdit at the causal layer corrects and inserts facts better than fine-tuning",
     "paired, subject-clustered interval of MultEdit − baseline on the harmonic mean of efficacy, generalization "
     "and specificity; holds if better than FT and FT-L on every track, does not hold if worse than either"),
]


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else (str(value) if isinstance(value, int) else f"{value:.{digits}f}")


def fmt_interval(value, low, high) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def load(path: Path) -> dict | None:
    """A complete output document, or None (missing, partial or unreadable: not evidence)."""
    return read_complete(path) if is_complete(path) else None


def interval_verdict(low: float, high: float, boundary: float = 0.0) -> str:
    """``holds`` when the interval lies above ``boundary``, ``does not hold`` below it, else ``inconclusive``."""
    if low > boundary:
        return HOLDS
    if high < boundary:
        return FAILS
    return UNSURE


def mean_interval(values, key: str, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of ``values`` by percentile bootstrap; the generator depends on ``key`` only."""
    data = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_interval(data, keyed_rng(seed, key), resamples=RESAMPLES)
    return float(data.mean()), float(low), float(high)


# --- trace measurements --------------------------------------------------------------------------


def find_group(stats: dict | None, kind: str, preferences) -> dict | None:
    """The first (corrupted, target) group of ``kind`` over all constraint counts, in preference order, that has a
    causal layer; else the first that is not null; else None."""
    if stats is None:
        return None
    measured = [group for corrupted, target in preferences for group in _groups(stats, kind, corrupted, target)
                if not group["null"]]
    return next((g for g in measured if g["causal_layers"]), measured[0] if measured else None)


def _groups(stats: dict, kind: str, corrupted: str, target: str) -> list[dict]:
    accepted, name = group_names(corrupted, target)
    return [group for wanted in accepted for group in stats["groups"]
            if (group["kind"], group["num_constraints"], group["corrupted"], group["target"]) == (kind, "all", wanted, name)]


def shared_group(documents: list[dict], kind: str, preferences) -> tuple[str, str] | None:
    """The first (corrupted, target) preference with a causal layer in EVERY document, else the first measured (not
    null) in every document: both sides of a comparison are read at the same group, never the best-looking one of
    each, and a group where some side restores nothing is passed over for one where both sides do."""
    def measured(doc, corrupted, target):
        return [g for g in _groups(doc, kind, corrupted, target) if not g["null"]]

    for needs_causal in (True, False):
        for corrupted, target in preferences:
            groups = [measured(doc, corrupted, target) for doc in documents]
            if all(groups) and (not needs_causal or all(has_causal_layer(g[0]) for g in groups)):
                return corrupted, target
    return None


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


def centre_of_mass(row: dict) -> float | None:
    """Where one question's restoration effect sits: Σ l·max(e_l, 0) / Σ max(e_l, 0) over its normalised effect,
    self-restoring layers (layer 0 at a corrupted position) left out; None when no layer has a positive effect."""
    effect = np.array([np.nan if v is None else v for v in row["normalised"]], dtype=np.float64)
    if row.get("restores_corrupted"):
        window = int(row["window"])
        effect[[layer for layer in range(len(effect)) if layer - window // 2 <= 0]] = np.nan
    weights = np.clip(np.nan_to_num(effect, nan=0.0), 0.0, None)
    if weights.sum() <= 0:
        return None
    return float((weights * np.arange(len(weights))).sum() / weights.sum())


def question_centres(folder: Path, kind: str, corrupted: str, target: str) -> dict[str, float]:
    """question id -> centre of mass of the named group's effect, over affected questions (traces.parquet)."""
    accepted, name = group_names(corrupted, target)
    centres = {}
    for row in pq.read_table(folder / "traces.parquet").to_pylist():
        if row["kind"] != kind or row["corrupted"] not in accepted or row["target"] != name:
            continue
        if row["p_corrupt"] > AFFECTED_RATIO * row["p_clean"]:
            continue  # not affected: its normalised effect is noise over noise
        centre = centre_of_mass(row)
        if centre is not None:
            centres[row["id"]] = centre
    return centres


def trace_validity(stats: dict) -> str | None:
    """Why a trace cannot test a retrieval finding (None: it can)."""
    target = stats.get("target", {})
    if target.get("mode") != "answer":
        return f"the trace scores the {target.get('mode')} target, which comes before the fact is retrieved"
    if target.get("prefix_subject", "keep") == "keep" and (target.get("hops") or {}).get("retrieval", 0):
        return "the forced prefix names the subject and was handed unchanged to the corrupted run (the subject leaks)"
    return None


def corruption_family(stats: dict) -> str:
    """replace, or noise (Gaussian noise at 3× the std of the input that carries the subject: the constraint's
    token embeddings, or the image features under image-noise)."""
    return "replace" if stats["options"]["corruption"] == "replace" else "noise"


def windows_of(stats: dict) -> dict:
    return stats.get("windows") or {"window": stats["options"]["window"]}


RETRIEVAL_PREFERENCES = (("visual", "constraint_last"), ("visual", "predicting"), ("visual", "last"))


def retrieval_layers_rule(early_folder: Path, late_folder: Path, labels=("MLLM", "text-only"),
                          preferences=RETRIEVAL_PREFERENCES) -> tuple[str, str]:
    """Finding 1's rule on two traces: is the fact retrieved earlier in ``early_folder``'s model than in
    ``late_folder``'s? Paired by question where both sides traced the same questions."""
    early, late = load(early_folder / "trace_stats.json"), load(late_folder / "trace_stats.json")
    if early is None or late is None:
        return UNTESTED, "a trace is missing or incomplete"
    for label, stats in zip(labels, (early, late)):
        reason = trace_validity(stats)
        if reason:
            return UNTESTED, f"{label}: {reason}"
    if corruption_family(early) != corruption_family(late) or windows_of(early) != windows_of(late):
        return UNTESTED, (f"the two sides were traced differently ({labels[0]}: {early['options']['corruption']}, "
                          f"windows {windows_of(early)}; {labels[1]}: {late['options']['corruption']}, windows "
                          f"{windows_of(late)})")
    chosen = shared_group([early, late], "mlp", preferences)
    if chosen is None:
        counts = "; ".join(describe_peak(label, find_group(s, "mlp", preferences)) for label, s in zip(labels, (early, late)))
        return UNTESTED, f"no route: no restored group has enough affected questions on both sides ({counts})"
    measured = [next(g for g in _groups(s, "mlp", *chosen) if not g["null"]) for s in (early, late)]
    if not all(has_causal_layer(g) for g in measured):
        # A centre of mass of effects that never cross the threshold is the centre of noise.
        counts = "; ".join(describe_peak(label, g) for label, g in zip(labels, measured))
        return UNTESTED, f"no causal MLP layer to locate on both sides at MLP window {windows_of(early).get('mlp', windows_of(early).get('window'))} ({counts})"
    a = question_centres(early_folder, "mlp", *chosen)
    b = question_centres(late_folder, "mlp", *chosen)
    group = f"{chosen[0]} → {group_names(*chosen)[1]}"
    paired = sorted(set(a) & set(b))
    if len(paired) >= MIN_QUESTIONS:
        mean, low, high = mean_interval([b[q] - a[q] for q in paired], f"f1:{group}")
        how = f"paired over {len(paired)} questions"
    elif min(len(a), len(b)) >= MIN_QUESTIONS:
        rng = keyed_rng(0, f"f1-unpaired:{group}")
        xa, xb = np.array(list(a.values())), np.array(list(b.values()))
        draws = (xb[rng.integers(0, len(xb), (RESAMPLES, len(xb)))].mean(1)
                 - xa[rng.integers(0, len(xa), (RESAMPLES, len(xa)))].mean(1))
        mean, (low, high) = float(xb.mean() - xa.mean()), np.percentile(draws, (2.5, 97.5))
        how = f"unpaired, n = {len(a)} and {len(b)}"
    else:
        return UNTESTED, f"too few questions with a measured effect ({labels[0]} {len(a)}, {labels[1]} {len(b)})"
    centres = ", ".join(f"{label} {np.mean(list(c.values())):.2f}" for label, c in zip(labels, (a, b)))
    evidence = (f"{group}, MLP, {early['options']['corruption']} / {late['options']['corruption']}, windows "
                f"{windows_of(early)}: centre of mass {centres}; {labels[1]} − {labels[0]} "
                f"{fmt_interval(mean, float(low), float(high))} layers ({how})")
    return interval_verdict(float(low), float(high), MIN_LAYER_GAP), evidence


def early_layers_rule(folder: Path, image_folder: Path | None = None,
                      kinds=("visual", "textual")) -> tuple[str, str]:
    """Finding 3's rule on multi-constraint traces: is each constraint kind retrieved in the first half of the
    layers? The textual constraint is read from ``folder`` (noise on its tokens); the visual one from
    ``image_folder`` when given (noise on the image the constraint refers to: a model that reads the picture
    where it answers, not at the constraint's words, is unaffected by noise on those words), else from ``folder``.
    Both traces must use the same window."""
    sources = {kind: image_folder if kind == "visual" and image_folder is not None else folder for kind in kinds}
    documents = {}
    for kind, source in sources.items():
        stats = load(Path(source) / "trace_stats.json")
        if stats is None:
            return UNTESTED, f"no multi-constraint trace for the {kind} constraint ({Path(source).name})"
        reason = trace_validity(stats)
        if reason:
            return UNTESTED, f"{kind} constraint: {reason}"
        documents[kind] = stats
    if len({json.dumps(windows_of(s), sort_keys=True) for s in documents.values()}) > 1:
        return UNTESTED, ("the constraint kinds were traced with different windows ("
                          + "; ".join(f"{k}: {windows_of(s)}" for k, s in documents.items()) + ")")
    verdicts, parts = [], []
    for kind, stats in documents.items():
        half = (stats["model"]["num_layers"] - 1) / 2
        chosen = shared_group([stats], "mlp", ((kind, "constraint_last"), (kind, "predicting"), (kind, "last")))
        group = next((g for g in _groups(stats, "mlp", *chosen) if not g["null"]), None) if chosen else None
        if not has_causal_layer(group):
            # a centre of mass of effects that never cross the threshold is the centre of noise
            return UNTESTED, f"{kind} constraint: " + describe_peak(stats["options"]["corruption"], group)
        centres = list(question_centres(Path(sources[kind]), "mlp", *chosen).values())
        if len(centres) < MIN_QUESTIONS:
            return UNTESTED, (f"{kind} constraint: too few questions whose answer its corruption affects "
                              f"({len(centres)}; {stats['counts']['traced']} traced of {stats['counts']['records']})")
        mean, low, high = mean_interval(centres, f"f3:{kind}")
        # holds when the interval lies below the middle layer (early), fails when above it
        verdicts.append(interval_verdict(half - high, half - low))
        parts.append(f"{kind} ({stats['options']['corruption']}, {chosen[0]} → {group_names(*chosen)[1]}): centre "
                     f"of mass {fmt_interval(mean, low, high)} (n = {len(centres)}, middle layer {half:g})")
    verdict = FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNSURE
    return verdict, "; ".join(parts) + f"; windows {windows_of(next(iter(documents.values())))}"


# --- attention measurements ----------------------------------------------------------------------


def image_to_constraint_rule(folder: Path) -> tuple[str, str]:
    """Finding 2's rule on one attention run: its ``finding_2`` block (knockout per layer band, read where the
    target is predicted), decided in ``harness.tracing.attention_study.finding_2``."""
    stats = load(folder / "attention_stats.json")
    if stats is None:
        return UNTESTED, "no attention run"
    block = stats.get("finding_2")
    if not block:
        return UNTESTED, "the attention run reads knockout at the prompt's last token (no per-band knockout at the target)"
    if "route" not in block:
        return UNTESTED, ("the attention run has no route knockout (every image token cut per band; attention "
                          "format 3): rerun attention")
    route = [f"layers {b['band'][0]}–{b['band'][1]}: {fmt_interval(b['share'], b['ci_low'], b['ci_high'])}"
             for b in block["route"]]
    selectivity = [f"layers {b['band'][0]}–{b['band'][1]}: {fmt_interval(b['difference'], b['ci_low'], b['ci_high'])}"
                   for b in block["bands"] if b["k"] == block["k"]]
    evidence = (f"{block['reason']}; share of p(target) lost with every image token cut from the constraint "
                f"tokens: {'; '.join(route)} (margin {block['margin']:.0%}); top-{block['k']} − random-{block['k']} "
                f"drop: {'; '.join(selectivity)} (n = {block['n']}, {block['num_layers']} layers)")
    return block["verdict"], evidence


def failure_prediction_rule(folder: Path) -> tuple[str, str]:
    """Finding 4's rule on one attention run (its ``finding_4`` block: read where the answer entity is predicted)."""
    stats = load(folder / "attention_stats.json")
    if stats is None:
        return UNTESTED, "no attention run"
    block = stats.get("finding_4")
    if not block:
        return UNTESTED, "the attention run reads the contribution at the prompt's last token, not where the answer is predicted"
    n, right = block.get("evaluation_n") or 0, block.get("evaluation_n_right") or 0
    low, high = block.get("contribution_ci_low"), block.get("contribution_ci_high")
    evidence = (f"AUROC of the contribution (layers {block.get('selected_layers')}) "
                f"{fmt_interval(block.get('auroc_contribution'), low, high)}, of the model's confidence "
                f"{fmt_interval(block.get('auroc_confidence'), block.get('confidence_ci_low'), block.get('confidence_ci_high'))}; "
                f"held-out half n = {n} ({right} right, {n - right} wrong; {block.get('n_not_located', 0)} answers "
                f"not located)")
    if min(right, n - right) < MIN_CLASS or low is None:
        return UNTESTED, f"too few right or wrong answers: {evidence}"
    return interval_verdict(low, high, 0.5), evidence


# --- editing ---------------------------------------------------------------------------------------


BASELINES = ("ft", "ft-l")


COMPARISON_VERDICTS = {"better": HOLDS, "worse": FAILS}  # "no difference detected": inconclusive


def comparison_verdict(entry: dict) -> str:
    """One paired comparison's verdict (``editing.metrics.paired_comparison``) as a finding verdict."""
    return COMPARISON_VERDICTS.get(entry["verdict"], UNSURE)


def describe_comparison(label: str, entry: dict) -> str:
    return (f"{label}: {entry['method']} − {entry['baseline']} "
            f"{fmt_interval(entry['difference'], entry['ci_low'], entry['ci_high'])} (n = {entry['n_edits']} edits, "
            f"{entry['n_subjects']} subjects): {entry['verdict']}")


def editing_rule(folders: list[Path], method: str = "multedit") -> tuple[str, str]:
    """Finding 5's rule on editing runs: ``method`` against every baseline, on every track run, from the runs'
    paired, subject-clustered comparisons of the harmonic mean."""
    parts, verdicts = [], []
    for folder in folders:
        results = load(folder / "editing_results.json")
        if results is None or method not in results.get("methods", {}):
            continue
        comparisons = results.get("comparisons")
        if not comparisons:
            parts.append(f"{folder.name}: no paired comparison recorded")
            verdicts.append(UNTESTED)
            continue
        track = results["options"]["track"]
        for entry in comparisons:
            if entry["method"] != method or entry["baseline"] not in BASELINES:
                continue
            parts.append(describe_comparison(track, entry))
            verdicts.append(comparison_verdict(entry))
    if not verdicts or UNTESTED in verdicts:
        return UNTESTED, "; ".join(parts) or "no editing run with MultEdit"
    verdict = FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNSURE
    return verdict, "; ".join(parts)


# --- the demo's run folders ------------------------------------------------------------------------


def where_retrieved(runs: Path, name: str) -> tuple[str, str]:
    """Window 1 decides (the paper's LLaVA setting); ROME's window, where the study ran it, is shown beside it."""
    verdict, evidence = retrieval_layers_rule(runs / f"{name}-trace-mllm", runs / f"{name}-trace-text-only")
    if (runs / f"{name}-trace-mllm-rome").exists():
        rome, rome_evidence = retrieval_layers_rule(runs / f"{name}-trace-mllm-rome", runs / f"{name}-trace-text-only-rome")
        evidence += f". With ROME's window: {rome}: {rome_evidence}"
    return verdict, evidence


def constraint_carries_image(runs: Path, name: str) -> tuple[str, str]:
    return image_to_constraint_rule(runs / f"{name}-attention")


def multi_constraint(runs: Path, name: str) -> tuple[str, str]:
    image = runs / f"{name}-trace-multi-image"
    return early_layers_rule(runs / f"{name}-trace-multi", image if image.exists() else None)


def failure_predictable(runs: Path, name: str) -> tuple[str, str]:
    return failure_prediction_rule(runs / f"{name}-attention")


def editing(runs: Path, name: str) -> tuple[str, str]:
    return editing_rule([f for f in sorted(runs.glob(f"{name}-edit*")) if not f.name.endswith("-sweep")])


TESTS = [where_retrieved, constraint_carries_image, multi_constraint, failure_predictable, editing]


def findings_section(runs: Path, models: list[str], controls: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """Markdown: one row per finding, one column per model (verdict and evidence), and, where given, the
    ground-truth controls' verdicts (finding number -> (positive verdict, null verdict)) beside them."""
    header = "| # | question | the paper's finding | rule | " + " | ".join(f"on {m}" for m in models)
    columns = 4 + len(models)
    if controls is not None:
        header += " | control: positive / null"
        columns += 1
    lines = [header + " |", "|" + "---|" * columns]
    for (number, question, claim, rule), test in zip(FINDINGS, TESTS):
        cells = []
        for model in models:
            verdict, evidence = test(runs, model)
            cells.append(f"**{verdict}**: {evidence}".replace("|", "\\|"))
        if controls is not None:
            positive, null = controls.get(number, (UNTESTED, UNTESTED))
            cells.append(f"{positive} / {null}")
        lines.append(f"| {number} | {question} | {claim} | {rule} | " + " | ".join(cells) + " |")
    return lines + [""]

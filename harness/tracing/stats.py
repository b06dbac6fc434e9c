"""Per-constraint statistics of a trace: what ``trace_stats.json`` and ``traces.parquet`` hold.

One trace row is one (example, corrupted thing, target positions, kind) with
its per-layer arrays. Rows are grouped by what was corrupted, where the
restoration happened and the kind (and once more by number of constraints);
each group gets, over its AFFECTED questions only (corruption at least halves
p_clean), the mean indirect effect per layer with a 95% bootstrap interval, the
mean normalised effect, Σeffect/Σgap, the causal layers (mean normalised
effect above a stated threshold) and the peak layer; all null below
``min_affected`` affected questions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.bootstrap import bootstrap_interval
from harness.outputs import read_complete, require_complete
from vqa_constraints.files import atomic_path, load_schema, write_text_atomic

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "trace_stats.schema.json"
AFFECTED_RATIO = 0.5  # an example is "affected" when corruption at least halves p(answer)
MIN_AFFECTED = 5  # fewer affected questions than this: the group's curve, peak and causal layers are null


def is_affected(p_clean: float, p_corrupt: float) -> bool:
    return p_corrupt <= AFFECTED_RATIO * p_clean


def summarise(rows: list[dict], threshold: float, bootstrap: int = 1000, seed: int = 0,
              min_affected: int = MIN_AFFECTED) -> list[dict]:
    """One summary per (corrupted, target, kind, num_constraints) group, plus the same over all constraint counts.

    Rows restored at a single text position (``--positions all``) are left out:
    position i means a different token in each question.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["target"] == "position":
            continue  # single positions are per-example heatmaps (plots.py), not averaged across questions
        for count in ("all", str(row["num_constraints"])):
            groups[(row["corrupted"], row["target"], row["kind"], count)].append(row)
    rng = np.random.default_rng(seed)
    summaries = []
    for (corrupted, target, kind, count), members in sorted(groups.items()):
        summaries.append(_summary(members, corrupted, target, kind, count, threshold, bootstrap, rng, min_affected))
    return summaries


def self_restoring_layers(members: list[dict], num_layers: int) -> list[int]:
    """Layers whose restoration window includes layer 0 at a corrupted position: such a restoration copies
    back the corrupted token itself (its clean embedding), not knowledge stored there."""
    if not any(m.get("restores_corrupted") for m in members):
        return []
    window = int(members[0]["window"])
    return [layer for layer in range(num_layers) if layer - window // 2 <= 0]


def _summary(members, corrupted, target, kind, count, threshold, bootstrap, rng, min_affected) -> dict:
    """Curves over the AFFECTED members only: an unaffected question (the corruption left p_clean about
    unchanged) has a gap near zero, and its normalised effect is noise divided by noise."""
    num_layers = len(members[0]["effect"])
    affected = [m for m in members if is_affected(m["p_clean"], m["p_corrupt"])]
    summary = {
        "corrupted": corrupted,
        "target": target,
        "kind": kind,
        "num_constraints": count,
        "n": len(members),
        "n_affected": len(affected),
        "mean_p_clean": float(np.mean([m["p_clean"] for m in members])),
        "mean_p_corrupt": float(np.mean([m["p_corrupt"] for m in members])),
        "restores_corrupted_layers": self_restoring_layers(members, num_layers),
        "null": len(affected) < min_affected,
    }
    if summary["null"]:
        # Too few affected questions for a curve: null, never a number read off noise.
        return {**summary, **{key: None for key in (
            "mean_effect", "ci_low", "ci_high", "mean_normalised", "effect_over_gap", "causal_layers", "peak_layer",
            "peak_agreement_affected")}}
    effect = np.array([m["effect"] for m in affected], dtype=np.float64)  # [n_affected, layers]
    normalised = np.array([[np.nan if v is None else v for v in m["normalised"]] for m in affected], dtype=np.float64)
    low, high = bootstrap_interval(effect, rng, resamples=bootstrap)  # one bound per layer
    mean_normalised = normalised.mean(axis=0)
    gap = sum(m["p_clean"] - m["p_corrupt"] for m in affected)
    effect_over_gap = effect.sum(axis=0) / gap  # Σeffect / Σgap: each question weighted by its gap
    # Self-restoring cells (layer 0 at a corrupted position: the corrupted token copied back) are drawn but
    # never a peak or a causal layer: they show the corruption undone, not where a fact is stored.
    self_cells = summary["restores_corrupted_layers"]
    eligible = np.nan_to_num(mean_normalised, nan=-np.inf)
    eligible[self_cells] = -np.inf
    peak = int(np.argmax(eligible))
    per_question = effect.copy()
    per_question[:, self_cells] = -np.inf
    agreement = float(np.mean([int(np.argmax(row)) == peak for row in per_question]))
    return {
        **summary,
        "mean_effect": _floats(effect.mean(axis=0)),
        "ci_low": _floats(low),
        "ci_high": _floats(high),
        "mean_normalised": _floats(mean_normalised),
        "effect_over_gap": _floats(effect_over_gap),
        "causal_layers": [int(l) for l in np.flatnonzero(eligible > threshold)],
        "peak_layer": peak,
        "peak_agreement_affected": agreement,
    }


def _floats(values) -> list[float | None]:
    return [round(float(v), 8) if np.isfinite(v) else None for v in values]


def group_names(corrupted: str, target: str) -> tuple[tuple[str, ...], str]:
    """(accepted ``corrupted`` values, ``target``) of a group named briefly.

    corrupted: ``visual`` (the visual constraint's tokens, or the image itself under image-noise),
    ``textual``, ``image``, or a group's full name; target: ``last`` (the prompt's last token),
    ``constraint`` / ``constraint_last`` (the corrupted constraint's tokens / its last token), ``predicting`` (the
    token that predicts the target, after a forced prefix), or a full name.
    """
    kinds = {"visual": ("visual constraint", "image"), "textual": ("textual constraint",), "image": ("image",)}
    accepted = kinds.get(corrupted, (corrupted,))
    kind = "textual" if corrupted == "textual" else "visual"
    targets = {"last": "last token", "constraint": f"{kind} constraint",
               "constraint_last": f"{kind} constraint (last token)", "predicting": "predicting token"}
    return accepted, targets.get(target, target)


PEAK_GROUP = ("visual", "last")  # the group trace_stats.json's own peak_mlp_layer reads


def peak_mlp_layer(stats: dict | str | Path, corrupted: str = PEAK_GROUP[0], target: str = PEAK_GROUP[1]) -> int | None:
    """The peak MLP layer of ONE named (corrupted, target) group over all constraint counts (MultEdit's
    default layer), e.g. ``peak_mlp_layer(stats, corrupted="visual", target="last")``.

    None when that group is absent or null (fewer affected questions than ``--min-affected``), or when no
    layer of it is causal (its effect never exceeds ``--threshold``): a peak is never taken from a group
    nobody measured, nor from noise. A trace not marked ``complete: true`` (an
    interrupted one) is refused with UserError.
    """
    stats = require_complete(stats, "trace_stats") if isinstance(stats, dict) else read_complete(stats)
    return peak_of_groups(stats["groups"], corrupted, target)


def peak_of_groups(groups: list[dict], corrupted: str = PEAK_GROUP[0], target: str = PEAK_GROUP[1]) -> int | None:
    """``peak_mlp_layer`` over summary groups (also of a partial trace, for its own document)."""
    accepted, name = group_names(corrupted, target)
    for wanted in accepted:  # in order: a visual-constraint group before the image's
        for group in groups:
            if (group["kind"], group["num_constraints"], group["corrupted"], group["target"]) == ("mlp", "all", wanted, name):
                # A group whose effect never crosses the threshold has a largest value, but no causal layer.
                return group["peak_layer"] if group["causal_layers"] else None
    return None


# --- writing (temp file, then rename: never a half-written output) -----------


def write_json(path: Path, document: dict) -> None:
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def write_parquet(path: Path, rows: list[dict]) -> None:
    columns = {
        "id": pa.string(),
        "config": pa.string(),
        "num_constraints": pa.int32(),
        "corrupted": pa.string(),
        "corrupted_index": pa.int32(),
        "target": pa.string(),
        "target_index": pa.int32(),
        "target_positions": pa.list_(pa.int32()),
        "target_text": pa.string(),
        "kind": pa.string(),
        "window": pa.int32(),
        "target_mode": pa.string(),  # answer | first-token
        "answer_source": pa.string(),  # gold (found in the model's output) | own-first-token | own-answer
        "answer_prefix": pa.string(),  # the model's own words teacher forced before the target
        "answer_text": pa.string(),  # the target as teacher forced ("" for the model's own top token)
        "answer_tokens": pa.list_(pa.int64()),  # the token ids scored
        "hop": pa.string(),  # recognition (subject target) | retrieval (subject in the prefix) | direct
        "bridge_positions": pa.list_(pa.int32()),  # prefix tokens naming the subject (targets.py)
        "prefix_corrupted": pa.list_(pa.int32()),  # of those, the ones corrupted with the constraint
        "predicting_position": pa.int32(),  # the token whose next-token distribution predicts the target
        "restores_corrupted": pa.bool_(),  # the restored positions include corrupted ones
        "p_clean": pa.float64(),
        "p_corrupt": pa.float64(),
        "p_restored": pa.list_(pa.float64()),
        "effect": pa.list_(pa.float64()),
        "normalised": pa.list_(pa.float64()),
        "engine": pa.string(),  # fast, or reference where the fast engine could not show exactness
    }
    schema = pa.schema(list(columns.items()))
    table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def validate(document: dict) -> None:
    """Raise jsonschema.ValidationError when ``document`` breaks the shipped trace_stats schema."""

    jsonschema.validate(document, load_schema("harness.tracing", "schemas", "trace_stats.schema.json"))

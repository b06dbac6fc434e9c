"""Per-constraint statistics of a trace: what ``trace_stats.json`` and ``traces.parquet`` hold.

One trace row is one (example, corrupted thing, target positions, kind) with
its per-layer arrays. Rows are grouped by what was corrupted, where the
restoration happened and the kind (and once more by number of constraints);
each group gets the mean indirect effect per layer with a 95% bootstrap
interval, the mean normalised effect, the causal layers (mean normalised
effect above a stated threshold) and the peak layer.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.bootstrap import bootstrap_interval

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "trace_stats.schema.json"
AFFECTED_RATIO = 0.5  # an example is "affected" when corruption at least halves p(answer)


def is_affected(p_clean: float, p_corrupt: float) -> bool:
    return p_corrupt <= AFFECTED_RATIO * p_clean


def summarise(rows: list[dict], threshold: float, bootstrap: int = 1000, seed: int = 0) -> list[dict]:
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
        summaries.append(_summary(members, corrupted, target, kind, count, threshold, bootstrap, rng))
    return summaries


def _summary(members, corrupted, target, kind, count, threshold, bootstrap, rng) -> dict:
    effect = np.array([m["effect"] for m in members], dtype=np.float64)  # [n, layers]
    normalised = np.array([m["normalised"] for m in members], dtype=np.float64)
    n = effect.shape[0]
    low, high = bootstrap_interval(effect, rng, resamples=bootstrap)  # one bound per layer
    finite = np.isfinite(normalised).any(axis=1)
    mean_normalised = normalised[finite].mean(axis=0) if finite.any() else np.full(effect.shape[1], np.nan)
    mean_effect = effect.mean(axis=0)
    curve = mean_normalised if np.isfinite(mean_normalised).all() else mean_effect
    peak = int(np.argmax(curve))
    affected = [i for i, m in enumerate(members) if is_affected(m["p_clean"], m["p_corrupt"])]
    agreement = None
    if affected:
        agreement = float(np.mean([int(np.argmax(effect[i])) == peak for i in affected]))
    return {
        "corrupted": corrupted,
        "target": target,
        "kind": kind,
        "num_constraints": count,
        "n": n,
        "n_affected": len(affected),
        "mean_p_clean": float(np.mean([m["p_clean"] for m in members])),
        "mean_p_corrupt": float(np.mean([m["p_corrupt"] for m in members])),
        "mean_effect": _floats(mean_effect),
        "ci_low": _floats(low),
        "ci_high": _floats(high),
        "mean_normalised": _floats(mean_normalised),
        "causal_layers": [int(l) for l in np.flatnonzero(np.nan_to_num(mean_normalised, nan=-np.inf) > threshold)],
        "peak_layer": peak,
        "peak_agreement_affected": agreement,
    }


def _floats(values) -> list[float | None]:
    return [round(float(v), 8) if np.isfinite(v) else None for v in values]


def peak_mlp_layer(stats: dict | str | Path, target: str | None = None) -> int | None:
    """The peak causal MLP layer of a trace (MultEdit's default layer).

    Among the MLP groups over all constraint counts (restricted to ``target``,
    e.g. "visual constraint" or "last token", when given), the group whose
    peak mean normalised effect is largest decides.
    """
    if not isinstance(stats, dict):
        stats = json.loads(Path(stats).read_text())
    best, best_value = None, -np.inf
    for group in stats["groups"]:
        if group["kind"] != "mlp" or group["num_constraints"] != "all":
            continue
        if target is not None and group["target"] != target:
            continue
        curve = group["mean_normalised"] if None not in group["mean_normalised"] else group["mean_effect"]
        value = curve[group["peak_layer"]]
        if value is not None and value > best_value:
            best, best_value = group["peak_layer"], value
    return best


# --- writing (temp file, then rename: never a half-written output) -----------


def write_json(path: Path, document: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
        "answer_tokens": pa.list_(pa.int64()),
        "p_clean": pa.float64(),
        "p_corrupt": pa.float64(),
        "p_restored": pa.list_(pa.float64()),
        "effect": pa.list_(pa.float64()),
        "normalised": pa.list_(pa.float64()),
    }
    schema = pa.schema(list(columns.items()))
    table = pa.Table.from_pylist([{name: row[name] for name in columns} for row in rows], schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def validate(document: dict) -> None:
    """Raise jsonschema.ValidationError when ``document`` breaks the shipped trace_stats schema."""
    import jsonschema

    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()))

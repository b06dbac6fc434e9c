"""Metrics from scored samples: per config and per constraint breakdown, each with n and a 95% bootstrap interval.

Everything here is a pure function of the sample lines and the seed, which is
what lets ``merge`` and ``leaderboard validate`` recompute a run's numbers.
"""

from __future__ import annotations

import math

import numpy as np

from harness.bootstrap import bootstrap_interval, keyed_rng

CONFIDENCE_LEVEL = 0.95
_TAIL = (1 - CONFIDENCE_LEVEL) / 2 * 100
# Computed from the level, the lower bound is 2.500000000000002, not 2.5: kept so that
# recomputed metrics (merge, leaderboard validate) equal the stored ones bit for bit.
CI_PERCENTILES = (_TAIL, 100 - _TAIL)
ALL = "all"

# breakdown name -> how to read its key from a sample
BREAKDOWNS = {
    "constraint_types": lambda s: s["constraint_types"],
    "num_constraints": lambda s: str(s["num_constraints"]),
    "source": lambda s: s["source"],
    "relation": lambda s: s["relation"],
}

# metric name -> sample field, for fields that may be null (scoring mode decides)
MEAN_FIELDS = {
    "accuracy": "correct",
    "exact_match": "exact",
    "gold_logprob": "gold_logprob",
    "confidence": "confidence",
}


def mean_with_ci(values: list[float], rng: np.random.Generator) -> dict:
    """Mean plus a percentile bootstrap interval (``CONFIDENCE_LEVEL``)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"value": None, "ci_low": None, "ci_high": None}
    low, high = bootstrap_interval(x, rng, percentiles=CI_PERCENTILES)
    return {"value": _round(x.mean()), "ci_low": _round(low), "ci_high": _round(high)}


def _round(value: float) -> float:
    # Fixed precision so recomputed numbers compare equal and files stay stable.
    return float(round(float(value), 6))


def cell_metrics(samples: list[dict], seed: int, *key: str) -> dict:
    """n plus each metric the samples carry (nulls mean 'not scored in this mode')."""
    cell: dict = {"n": len(samples)}
    for metric, field in MEAN_FIELDS.items():
        values = [s[field] for s in samples if s.get(field) is not None]
        if values:
            cell[metric] = mean_with_ci([float(v) for v in values], keyed_rng(seed, *key, metric))
    return cell


def group_metrics(samples: list[dict], seed: int, name: str) -> dict:
    metrics = cell_metrics(samples, seed, name)
    metrics["by"] = {}
    for breakdown, key_of in BREAKDOWNS.items():
        groups: dict[str, list[dict]] = {}
        for sample in samples:
            groups.setdefault(key_of(sample), []).append(sample)
        metrics["by"][breakdown] = {
            key: cell_metrics(members, seed, name, breakdown, key) for key, members in sorted(groups.items())
        }
    return metrics


def compute_metrics(samples: list[dict], configs: list[str], seed: int) -> dict:
    """``{"all": ..., config: ...}``, each with n, metrics and ``by`` breakdowns."""
    metrics = {ALL: group_metrics(samples, seed, ALL)}
    for config in configs:
        members = [s for s in samples if s["config"] == config]
        metrics[config] = group_metrics(members, seed, config)
    return metrics


def metrics_close(a, b, tolerance: float = 1e-6, path: str = "metrics") -> list[str]:
    """Paths where two metric trees differ (numbers compared within ``tolerance``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        problems = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                problems.append(f"{path}.{key} is {'missing' if key not in a else 'unexpected'}")
            else:
                problems.extend(metrics_close(a[key], b[key], tolerance, f"{path}.{key}"))
        return problems
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if math.isclose(a, b, abs_tol=tolerance) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]

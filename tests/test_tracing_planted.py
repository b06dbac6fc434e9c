"""MultimodalCausalTrace against ground truth: the planted model stores its facts in layer K's MLP."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from harness.tracing.causal_trace import TraceOptions, peak_mlp_layer, run_trace
from harness.tracing.stats import SCHEMA_PATH, is_affected

LIMIT = 80


def _options(model, data, out, **overrides) -> TraceOptions:
    base = dict(model=str(model), data=str(data), config="single_constraint", out=out, corruption="image-noise",
                kinds=("mlp",), positions="last", limit=LIMIT, noise_samples=5, dtype="float32", device="cpu",
                progress=False, bootstrap=200)
    base.update(overrides)
    return TraceOptions(**base)


PEAK_SHARE_AT_K = 0.85  # what the issue asks


@pytest.fixture(scope="session")
def planted_layer(planted_model_dir) -> int:
    return int(json.loads((planted_model_dir / "config.json").read_text())["planted_layer"])


@pytest.fixture(scope="session")
def image_noise_trace(planted_model_dir, planted_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace-image-noise")
    return run_trace(_options(planted_model_dir, planted_data_dir, out))


def test_mlp_restoration_peaks_at_the_planted_layer(image_noise_trace, planted_layer):
    table = pq.read_table(image_noise_trace / "traces.parquet").to_pylist()
    rows = [r for r in table if r["kind"] == "mlp" and r["target"] == "last token"]
    affected = [r for r in rows if is_affected(r["p_clean"], r["p_corrupt"])]
    assert len(affected) >= 20, f"only {len(affected)} of {len(rows)} traced questions are affected by image noise"
    peaks = [int(np.argmax(r["effect"])) for r in affected]
    share = np.mean([p == planted_layer for p in peaks])
    assert share >= PEAK_SHARE_AT_K, f"peak at K={planted_layer} for {share:.0%} of affected questions (peaks: {np.bincount(peaks)})"
    counts = np.bincount(peaks, minlength=planted_layer + 1)
    assert counts[planted_layer] >= 3 * max(c for layer, c in enumerate(counts) if layer != planted_layer)

    stats = json.loads((image_noise_trace / "trace_stats.json").read_text())
    group = next(g for g in stats["groups"] if g["kind"] == "mlp" and g["target"] == "last token"
                 and g["num_constraints"] == "all")
    assert group["peak_layer"] == planted_layer
    assert planted_layer in group["causal_layers"]
    assert peak_mlp_layer(image_noise_trace / "trace_stats.json") == planted_layer


def test_stats_validate_and_account_for_every_question(image_noise_trace):
    jsonschema = pytest.importorskip("jsonschema")
    stats = json.loads((image_noise_trace / "trace_stats.json").read_text())
    jsonschema.validate(stats, json.loads(SCHEMA_PATH.read_text()))
    counts = stats["counts"]
    table = pq.read_table(image_noise_trace / "traces.parquet")
    assert len(set(table.column("id").to_pylist())) == counts["traced"] > 0
    assert counts["traced"] + sum(counts["skipped"].values()) == counts["records"] == LIMIT
    for group in stats["groups"]:
        for low, mean, high in zip(group["ci_low"], group["mean_effect"], group["ci_high"]):
            assert low - 1e-9 <= mean <= high + 1e-9
    assert sorted(p.name for p in image_noise_trace.glob("*.png"))


def test_same_inputs_give_byte_identical_outputs(planted_model_dir, planted_data_dir, tmp_path):
    outs = [run_trace(_options(planted_model_dir, planted_data_dir, tmp_path / str(i), limit=6, kinds=("mlp", "attn")))
            for i in range(2)]
    for name in ("trace_stats.json", "traces.parquet"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


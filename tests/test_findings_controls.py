"""The study's rules on ground truth: each must give the known verdict on its positive and null controls, and
refuse ("not tested") a measurement that cannot see the effect."""

from __future__ import annotations

import json

from harness.study.controls import EXPECTED, finding1_control
from harness.study.findings import FAILS, HOLDS, UNTESTED, retrieval_layers_rule
from harness.tracing.causal_trace import TraceOptions, run_trace


def _trace(model, data, out, **overrides):
    options = dict(model=str(model), data=str(data), config="single_constraint", out=out, corruption="image-noise",
                   kinds=("mlp",), positions="last", limit=12, noise_samples=2, dtype="float32", device="cpu",
                   progress=False, bootstrap=50)
    options.update(overrides)
    return run_trace(TraceOptions(**options))


def test_finding1_rule_gives_the_known_verdicts_on_planted_layers(planted_data_dir, tmp_path):
    """Facts at MLP 2 vs 4: retrieved earlier on the first side (holds); MLP 2 under two seeds: never holds."""
    document = finding1_control(tmp_path, planted_data_dir, limit=24)
    assert document["positive"]["verdict"] == HOLDS, document["positive"]["evidence"]
    assert document["null"]["verdict"] in EXPECTED["null"], document["null"]["evidence"]
    assert all(document[side]["passes"] for side in ("positive", "null"))
    # the evidence quotes the paired difference with its interval and n
    assert "paired over" in document["positive"]["evidence"] and "[" in document["positive"]["evidence"]


def test_finding1_rule_refuses_traces_that_cannot_be_compared(planted_model_dir, planted_data_dir, tmp_path):
    image = _trace(planted_model_dir, planted_data_dir, tmp_path / "image")
    # another corruption family on one side: the comparison is refused, not decided
    replaced = _trace(planted_model_dir, planted_data_dir, tmp_path / "replace", corruption="replace",
                      positions="constraint")
    verdict, evidence = retrieval_layers_rule(image, replaced)
    assert verdict == UNTESTED and "traced differently" in evidence
    # another window on one side: refused too
    wide = _trace(planted_model_dir, planted_data_dir, tmp_path / "wide", window="mlp=3")
    verdict, evidence = retrieval_layers_rule(image, wide)
    assert verdict == UNTESTED and "traced differently" in evidence
    # a target read before the fact (the model's own first token) cannot locate retrieval
    first = _trace(planted_model_dir, planted_data_dir, tmp_path / "first", target="first-token")
    verdict, evidence = retrieval_layers_rule(first, image)
    assert verdict == UNTESTED and "first-token target" in evidence
    # effects that never cross the threshold: their centre of mass is noise, so nothing is decided
    faint = _trace(planted_model_dir, planted_data_dir, tmp_path / "faint", threshold=5.0)
    verdict, evidence = retrieval_layers_rule(image, faint)
    assert verdict == UNTESTED and "no causal MLP layer" in evidence
    # the same trace on both sides: no difference, and never "holds"
    verdict, evidence = retrieval_layers_rule(image, image)
    assert verdict == FAILS, evidence
    stats = json.loads((image / "trace_stats.json").read_text())
    assert stats["windows"] == {"hidden": 1, "mlp": 1, "attn": 1} and stats["target"]["prefix_subject"] == "corrupt"


def test_rome_window_is_scaled_to_the_planted_depth(planted_model_dir, planted_data_dir, tmp_path):
    out = _trace(planted_model_dir, planted_data_dir, tmp_path / "rome", window="rome", limit=4)
    # 10 of GPT-2 XL's 48 layers, scaled to 6 layers, rounds to 1
    assert json.loads((out / "trace_stats.json").read_text())["windows"] == {"hidden": 1, "mlp": 1, "attn": 1}

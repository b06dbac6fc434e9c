"""The study's rules on ground truth: each must give the known verdict on its positive and null controls, and
refuse ("not tested") a measurement that cannot see the effect."""

from __future__ import annotations

import json

from harness.study.controls import (
    EXPECTED,
    finding1_control,
    finding2_control,
    finding3_control,
    finding4_control,
    finding5_control,
)
from harness.study.findings import FAILS, HOLDS, UNTESTED, early_layers_rule, retrieval_layers_rule
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


def test_finding2_rule_gives_the_known_verdicts_on_the_routed_control(planted_data_dir, tmp_path):
    """planted-routed with its route enforced (the image reaches the answer only through the constraint tokens in
    layers 0-1): holds; planted (its answer position reads the image itself): never holds."""
    document = finding2_control(tmp_path, planted_data_dir, limit=16)
    assert document["positive"]["verdict"] == HOLDS, document["positive"]["evidence"]
    assert document["null"]["verdict"] in EXPECTED["null"], document["null"]["evidence"]
    assert document["positive"]["evidence"].startswith("layers 0-1: cutting the image from the constraint tokens")


def test_finding4_rule_gives_the_known_verdicts_on_the_routed_control(planted_data_dir, tmp_path):
    """A known half read the constraint phrase 1e-4 times less (failures the contribution predicts): holds; a
    known random half relabelled wrong (failures nothing in the model predicts): never holds. 40 questions: the
    AUROC's held-out half needs enough wrong answers (at 16 and 24 the positive was not tested)."""
    document = finding4_control(tmp_path, planted_data_dir, limit=40)
    assert document["positive"]["verdict"] == HOLDS, document["positive"]["evidence"]
    assert document["null"]["verdict"] in EXPECTED["null"], document["null"]["evidence"]
    for side in ("positive", "null"):
        assert "held-out half n = 20" in document[side]["evidence"], document[side]["evidence"]


def test_finding3_rule_gives_the_known_verdicts_on_planted_layers(planted_data_dir, tmp_path):
    """Multi-constraint facts at MLP 2 of 6 (nothing later can be causal): both kinds early (holds); at MLP 4: the
    image's facts are retrieved in the second half (never holds)."""
    document = finding3_control(tmp_path, planted_data_dir, limit=40)
    assert document["positive"]["verdict"] == HOLDS, document["positive"]["evidence"]
    assert document["null"]["verdict"] in EXPECTED["null"], document["null"]["evidence"]
    # each kind is read from the trace that corrupts it, with its n and interval
    for side in ("positive", "null"):
        evidence = document[side]["evidence"]
        assert "visual (image-noise" in evidence and "textual (noise" in evidence and "n = " in evidence


def test_finding3_rule_refuses_what_cannot_see_the_visual_constraint(planted_model_dir, planted_data_dir, tmp_path):
    tokens = _trace(planted_model_dir, planted_data_dir, tmp_path / "tokens", config="multi_constraint",
                    corruption="noise", positions="constraint", limit=24)
    # the planted model reads the picture at its last token: noise on the words "the creature in this image"
    # changes no answer, so on the token trace alone the visual side is not tested (never a verdict)
    verdict, evidence = early_layers_rule(tokens)
    assert verdict == UNTESTED and evidence.startswith("visual constraint"), evidence
    # the visual side traced with another window than the textual side: refused
    image = _trace(planted_model_dir, planted_data_dir, tmp_path / "image", config="multi_constraint",
                   corruption="image-noise", positions="constraint", limit=24, window="mlp=3")
    verdict, evidence = early_layers_rule(tokens, image)
    assert verdict == UNTESTED and "different windows" in evidence


def test_finding5_verdict_gives_the_known_answers_on_planted_edits(planted_data_dir, tmp_path):
    """MultEdit at the planted layer against one layer above (a silent MLP): better; two silent layers against
    each other: never better."""
    document = finding5_control(tmp_path, planted_data_dir, limit=8)
    assert document["positive"]["verdict"] == HOLDS, document["positive"]["evidence"]
    assert document["null"]["verdict"] in EXPECTED["null"], document["null"]["evidence"]
    assert "multedit at layer 2 − multedit at layer 3" in document["positive"]["evidence"]
    assert "n = 8 edits" in document["positive"]["evidence"]


def test_controls_of_some_findings_keep_the_others_verdicts(planted_data_dir, tmp_path):
    import shutil

    from harness.study.controls import run_controls

    shutil.copytree(planted_data_dir, tmp_path / "data" / "planted")  # run_controls builds it when missing
    run_controls(tmp_path, limit=4, findings=("5",))
    path = run_controls(tmp_path, limit=4, findings=("3",))
    assert sorted(json.loads(path.read_text())["controls"]) == ["3", "5"]
    # other settings: the earlier verdicts are not theirs, so they are not kept
    path = run_controls(tmp_path, limit=6, findings=("5",))
    assert sorted(json.loads(path.read_text())["controls"]) == ["5"]

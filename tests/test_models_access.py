"""The model access layer on tiny randomly initialised checkpoints of every supported family.

Real transformers models, real processors, real forward passes: layers and
their parts are found, image tokens sit where the processor put them and
match the vision tower's feature count, and constraint character spans map
to exactly the tokens that spell them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.hooks import record_outputs
from harness.models.loading import load_model
from harness.models.tiny import build_tiny
from vqa_constraints.errors import UserError

# (family, build options): the planted-style variant has a word-level tokenizer and no chat template.
VARIANTS = {
    "llava": ("llava", {}),
    "llava_plain": ("llava", {"word_level": True, "chat_template": False}),
    "llava_next": ("llava_next", {}),
    "qwen2_vl": ("qwen2_vl", {}),
    "idefics3": ("idefics3", {}),
}
QUESTION = "What is the capital of the country whose flag is in this image, an archipelago in Europe?"


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("tiny-access")
    cache = {}

    def get(variant: str):
        if variant not in cache:
            family, options = VARIANTS[variant]
            folder = build_tiny(family, root / variant, **options) if options else tiny_model_dirs(family)
            cache[variant] = load_model(folder, device="cpu")
        return cache[variant]

    return get


def image(height=32, width=40, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_inputs(encoded):
    return {k: v for k, v in encoded.inputs.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")}


def feature_count(adapter, encoded) -> int:
    """Number of image feature vectors the vision side produces for this input."""
    features = adapter.model.model.get_image_features(**image_inputs(encoded)).pooler_output
    hidden = adapter.model.config.text_config.hidden_size
    parts = features if isinstance(features, (list, tuple)) else [features]
    return sum(part.numel() // hidden for part in parts)


def span(question: str, phrase: str) -> tuple[int, int]:
    start = question.index(phrase)
    return start, start + len(phrase)


def decoded(adapter, encoded, positions) -> str:
    ids = encoded.input_ids[0, positions].tolist()
    return "".join(adapter.tokenizer.decode(ids).split()).lower()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layers_and_their_parts(adapters, variant):
    adapter = adapters(variant)
    text_config = adapter.model.config.text_config
    assert adapter.is_multimodal
    assert adapter.num_layers == text_config.num_hidden_layers
    encoded = adapter.encode(QUESTION, image())
    last = adapter.num_layers - 1
    parts = {"layer": adapter.layers()[last], "mlp": adapter.mlp(last), "attn": adapter.attention(last)}
    with torch.no_grad(), record_outputs(parts) as seen:
        adapter.model(**encoded.inputs)
    for name in parts:
        assert seen[name].shape == (1, encoded.length, text_config.hidden_size), name
    down = adapter.mlp_out_proj(0)
    assert (down.in_features, down.out_features) == (text_config.intermediate_size, text_config.hidden_size)
    assert adapter.embed_tokens().num_embeddings == text_config.vocab_size
    with pytest.raises(UserError, match="out of range"):
        adapter.mlp(adapter.num_layers)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_image_tokens_match_processor_and_vision_features(adapters, variant):
    adapter = adapters(variant)
    encoded = adapter.encode(QUESTION, image(48, 40))
    ids = encoded.input_ids[0]
    assert encoded.image_positions == (ids == adapter.image_token_id).nonzero().flatten().tolist()
    assert len(encoded.image_positions) == feature_count(adapter, encoded) > 0
    assert all(encoded.token_char_spans[p] == (-1, -1) for p in encoded.image_positions)
    with torch.no_grad(), record_outputs({"img": adapter.image_features_module()}) as seen:
        adapter.model(**encoded.inputs)
    assert seen["img"].shape[-1] == adapter.model.config.text_config.hidden_size
    if variant != "llava_next":  # LLaVA-NeXT unpads tiles and adds newline rows after the projector
        assert seen["img"].numel() // seen["img"].shape[-1] == len(encoded.image_positions)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("phrase", ["capital", "the country whose flag is in this image", "chip", "Europe"])
def test_constraint_span_maps_to_the_tokens_that_spell_it(adapters, variant, phrase):
    adapter = adapters(variant)
    encoded = adapter.encode(QUESTION, image())
    assert encoded.prompt[encoded.question_start : encoded.question_start + len(QUESTION)] == QUESTION
    start, end = span(QUESTION, phrase)
    positions = encoded.positions_for_question_span(start, end)
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert not set(positions) & set(encoded.image_positions)
    target = phrase.replace(" ", "").lower()
    assert target in decoded(adapter, encoded, positions)
    if len(positions) > 1:  # minimal: dropping either end loses part of the phrase
        assert target not in decoded(adapter, encoded, positions[1:])
        assert target not in decoded(adapter, encoded, positions[:-1])
    if phrase == "the country whose flag is in this image":
        assert len(positions) >= 8


def test_sub_word_span_inside_a_split_word(adapters):
    """'chip' inside 'archipelago': the BPE splits the word, and only the pieces covering 'chip' are taken."""
    adapter = adapters("llava")
    encoded = adapter.encode(QUESTION, image())
    word = encoded.positions_for_question_span(*span(QUESTION, "archipelago"))
    part = encoded.positions_for_question_span(*span(QUESTION, "chip"))
    assert len(word) > 1 and set(part) <= set(word)
    assert "chip" in decoded(adapter, encoded, part)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_teacher_forced_answer_positions(adapters, variant):
    adapter = adapters(variant)
    encoded = adapter.encode(QUESTION, image(), answer="Paris")
    assert encoded.text.startswith(encoded.prompt) and encoded.text.endswith("Paris")
    answer_ids = encoded.input_ids[0, encoded.answer_positions].tolist()
    assert answer_ids == adapter.answer_token_ids("Paris")
    assert encoded.last_position == encoded.answer_positions[0] - 1
    assert "".join(adapter.tokenizer.decode(answer_ids).split()).lower() == "paris"
    with torch.no_grad():
        logits = adapter.model(**encoded.inputs).logits
    assert torch.isfinite(logits).all()


def test_prompt_uses_chat_template_or_fallback(adapters):
    from harness.models.prompting import fallback_prompt

    plain = adapters("llava_plain")
    assert plain.build_prompt("Q?") == fallback_prompt("Q?")
    templated = adapters("llava")
    prompt, start = templated.build_prompt("Q?")
    assert prompt[start : start + 2] == "Q?" and "<image>" in prompt and prompt.endswith("ASSISTANT:")
    text_prompt, _ = templated.text_only().build_prompt("Q?")
    assert "<image>" not in text_prompt


def test_text_only_view_runs_the_same_language_model(adapters):
    adapter = adapters("llava")
    text = adapter.text_only()
    assert not text.is_multimodal and text.layers() == adapter.layers()
    encoded = text.encode(QUESTION, answer="Paris")
    assert "pixel_values" not in encoded.inputs and not encoded.image_positions
    assert text.encode(QUESTION).positions_for_question_span(*span(QUESTION, "capital"))
    with torch.no_grad():
        assert adapter.model(**encoded.inputs).logits.shape[1] == encoded.length
    with pytest.raises(UserError, match="needs an image"):
        adapter.encode(QUESTION)

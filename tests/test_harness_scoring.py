"""Answer matching, and generation / log-likelihood scoring on the planted model (image and text-only paths)."""

from __future__ import annotations

import math

import pytest
from harness_support import planted_adapter, planted_records  # noqa: F401  (session fixtures)

from harness import scoring
from harness.scoring import Prompt, answer_correct, exact_match, normalize_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An   apple,\tthe pie. ", "apple pie"),
        ("Rome", "rome"),
        ("a", ""),
        ("U.S.A.", "usa"),
        ("Guinea-Bissau", "guineabissau"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_answer_correct_requires_whole_words():
    assert answer_correct("It is Paris.", ["paris"])
    assert answer_correct("the capital is New  York city", ["New York"])
    assert not answer_correct("Parisian", ["Paris"])
    assert not answer_correct("York", ["New York"])
    assert answer_correct("lyon", ["Paris", "Lyon"])  # any gold answer counts
    assert not answer_correct("", ["Paris"])
    assert not answer_correct("the", ["the"])  # a gold answer that normalises to nothing never matches


def test_exact_match_is_stricter_than_containment():
    assert exact_match("The Paris!", ["paris"])
    assert not exact_match("It is Paris.", ["paris"])
    assert answer_correct("It is Paris.", ["paris"])


def test_planted_model_answers_planted_questions(planted_adapter, planted_records):
    predictions = scoring.generate_answers(planted_adapter, planted_records, batch_size=8)
    correct = [answer_correct(p, r.answers) for p, r in zip(predictions, planted_records)]
    assert sum(correct) / len(correct) >= 0.8, list(zip(predictions, [r.answers for r in planted_records]))


def test_generation_is_batch_invariant(planted_adapter, planted_records):
    one = scoring.generate(planted_adapter, planted_records[:8], batch_size=1)
    eight = scoring.generate(planted_adapter, planted_records[:8], batch_size=8)
    assert [g.text for g in one] == [g.text for g in eight]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(one, eight)) < 1e-4


def test_logprobs_are_batch_invariant_and_multi_token(planted_adapter, planted_records):
    # A two-word continuation makes every request multi-token.
    records = planted_records[:8]
    items = [(r, r.answers[0]) for r in records] + [(r, f"{r.answers[0]} {r.answers[0]}") for r in records]
    one = scoring.answer_logprobs(planted_adapter, items, batch_size=1)
    eight = scoring.answer_logprobs(planted_adapter, items, batch_size=8)
    assert max(abs(a - b) for a, b in zip(one, eight)) < 1e-4
    n = len(records)
    # Log-probabilities are sums over tokens: a longer continuation is less likely.
    assert all(single > double for single, double in zip(one[:n], one[n:]))


def test_gold_answer_outscores_a_wrong_one(planted_adapter, planted_records):
    wrong = [planted_records[(i + 1) % len(planted_records)].answers[0] for i in range(len(planted_records))]
    pairs = [(r, w) for r, w in zip(planted_records, wrong) if scoring.normalize_answer(w) not in map(normalize_answer, r.answers)]
    gold = scoring.answer_logprobs(planted_adapter, [(r, r.answers[0]) for r, _ in pairs])
    other = scoring.answer_logprobs(planted_adapter, pairs)
    assert sum(g > o for g, o in zip(gold, other)) >= 0.8 * len(pairs)


def test_confidence_is_first_generated_token_probability(planted_adapter, planted_records):
    generated = scoring.generate(planted_adapter, planted_records[:6])
    forward = scoring.confidences(planted_adapter, planted_records[:6])
    for g, c in zip(generated, forward):
        assert 0.0 < g.confidence <= 1.0
        assert math.isclose(g.confidence, c, abs_tol=1e-4)


def test_text_only_path(planted_adapter, planted_records):
    text_adapter = planted_adapter.text_only()
    records = planted_records[:8]
    # Records on a text-only adapter are asked their text_only_question.
    answers = scoring.generate_answers(text_adapter, records, batch_size=3)
    same = scoring.generate_answers(text_adapter, [Prompt(r.text_only_question) for r in records], batch_size=8)
    assert answers == same
    assert all(isinstance(a, str) for a in answers)
    logprobs = scoring.answer_logprobs(text_adapter, records, batch_size=3)
    assert all(lp < 0 for lp in logprobs)
    assert logprobs == pytest.approx(scoring.answer_logprobs(text_adapter, records, batch_size=8), abs=1e-4)


def test_requests_reject_unknown_items(planted_adapter):
    with pytest.raises(TypeError):
        scoring.generate_answers(planted_adapter, ["just a string"])

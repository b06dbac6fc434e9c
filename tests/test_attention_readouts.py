"""Where the attention study reads: the token that predicts the scored target, after the model's own prefix.

Readouts are checked on the tiny families (a SentencePiece-style LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3) with
answers written out for them, so the prefix, the read position and the scored token are known in advance.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from harness.scoring import Generation
from harness.tracing.attention import question_contributions
from harness.tracing.attention_study import (
    StudyOptions,
    analyse_questions,
    finding_2,
    locate_entities,
    prefix_names_subject,
    resolve_target,
    summarize,
)
from harness.tracing.knockout import layer_bands, next_token_probs
from vqa_constraints.records import Constraint, Record

QUESTION = "What is the capital of the country whose flag is in this image?"
VISUAL = "the country whose flag is in this image"


def record(subject: str, answer: str, index: int = 0) -> Record:
    image = Image.fromarray(np.random.default_rng(index).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    constraint = Constraint.locate(QUESTION, VISUAL, "visual", subject, "depicted_by_image")
    return Record(id=f"q{index}", source="test", config="single_constraint", split="test", image=image,
                  question=QUESTION, answers=[answer], constraints=[constraint], subject=subject, relation="capital")


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs):
    from harness.models.loading import load_model

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(str(tiny_model_dirs(family)), device="cpu", dtype="float32")
        return cache[family]

    return get


def starts_at(target, word: str) -> bool:
    """The scored token (the one after the read position) begins where ``word`` begins in the forced text."""
    encoded = target.encoded
    begin = encoded.answer_start + len(target.prefix)
    assert encoded.text[begin:].startswith(word)
    a, b = encoded.token_char_spans[target.position + 1]
    return a <= begin < b and int(encoded.input_ids[0, target.position + 1]) == target.token


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "idefics3"])
def test_readouts_are_taken_where_the_target_is_predicted(adapters, family):
    adapter = adapters(family)
    item = record("Atlantis", "Paris")
    sentence = "The capital of Atlantis is Paris."

    target, answer, names = resolve_target(adapter, item, sentence, "auto")
    assert names is True  # the prefix "The capital of Atlantis is " names the subject
    assert (answer.mode, answer.prefix) == ("answer", "The capital of Atlantis is ")
    assert starts_at(answer, "Paris")
    # auto scores the subject (the recognition hop): the forced prefix would otherwise carry it
    assert (target.mode, target.prefix) == ("subject", "The capital of ")
    assert starts_at(target, "Atlantis")
    assert target.prompt_last < target.position < answer.position

    # p(target) is read at that position: same as a plain forward's distribution there
    qc = question_contributions(adapter, item, target.encoded, [target.position])
    with torch.no_grad():
        logits = adapter.model(**target.encoded.inputs).logits[0, target.position].float()
    assert torch.allclose(qc.probs[0], torch.softmax(logits, -1), atol=1e-4)
    blocks = [adapter.attention(l) for l in range(adapter.num_layers)]
    assert torch.allclose(next_token_probs(adapter.model, blocks, target.encoded.inputs, position=target.position),
                          qc.probs[0], atol=1e-4)
    assert qc.constraint_to_read.shape == (adapter.num_layers, 1)

    # a model that answers directly: no prefix, the answer is read at the prompt's last token
    direct, direct_answer, names = resolve_target(adapter, item, "Paris", "auto")
    assert names is False and direct is direct_answer
    assert direct.mode == "answer" and direct.prefix == "" and direct.position == direct.prompt_last
    assert starts_at(direct, "Paris")
    # the first-token mode reads the bare prompt's last token
    first, _, _ = resolve_target(adapter, item, sentence, "first-token")
    assert first.token is None and first.position == first.encoded.length - 1 == first.prompt_last
    # a wrong answer has no gold target
    assert resolve_target(adapter, item, "The capital of Atlantis is Rome.", "answer")[0] is None


def test_prefix_names_subject_is_a_whole_word_match():
    assert prefix_names_subject("The capital of Costa Rica is ", "Costa Rica")
    assert prefix_names_subject("In the U.S.A. people speak ", "USA")
    assert not prefix_names_subject("The capital of Costa Ricans is ", "Costa Rica")
    assert not prefix_names_subject("", "Chad")


def test_wrong_answers_are_read_at_their_entity_or_skipped(adapters):
    adapter = adapters("llava")
    records = [record("Atlantis", "Paris", 0), record("Lemuria", "Tokyo", 1), record("Mu", "Rome", 2)]
    generations = [
        Generation("The capital of Atlantis is Paris.", 0.5),  # right
        Generation("The capital of Narnia is Oslo.", 0.5),  # wrong, same prefix pattern: entity "Oslo"
        Generation("I do not know.", 0.5),  # wrong, no right answer's prefix fits: skipped
    ]
    options = StudyOptions(top_k=2, draws=2, band_ks=(1, 2), progress=False)
    rows, skipped = analyse_questions(adapter, records, options, generations=generations)
    assert len(rows) == 3 and not skipped
    located = locate_entities(rows)
    right, wrong, lost = located

    assert right["entity_located_by"] == "gold" and right["entity_prefix"] == "The capital of Atlantis is "
    assert right["target_mode"] == "subject" and right["target_prefix"] == "The capital of "
    assert right["target_read_position"] < right["entity_read_position"]
    bands = layer_bands(adapter.num_layers)
    assert np.asarray(right["band_p_top"]).shape == (len(bands), 2)
    assert len(right["band_p_all"]) == len(bands)
    assert all(0.0 <= p <= 1.0 for p in right["band_p_all"])  # p(target), every image token cut, per band

    assert wrong["entity_located_by"] == "prefix-pattern" and wrong["entity_prefix"] == "The capital of Narnia is "
    # read where the model predicts " Oslo" after its own words: check against a plain forward
    encoded = adapter.encode(QUESTION, records[1].image, answer=generations[1].text)
    q = wrong["entity_read_position"]
    start = encoded.answer_start + len("The capital of Narnia is ")
    a, b = encoded.token_char_spans[q + 1]
    assert a <= start < b and int(encoded.input_ids[0, q + 1]) == wrong["entity_token"]
    with torch.no_grad():
        p = torch.softmax(adapter.model(**encoded.inputs).logits[0, q].float(), -1)[wrong["entity_token"]]
    assert abs(float(p) - wrong["confidence"]) < 1e-4
    assert "knockout_constraint_p_top" not in wrong  # knockouts only for right answers

    assert lost["entity_located_by"] is None and lost["confidence"] is None

    header = {"num_layers": adapter.num_layers}
    stats = summarize(rows, Counter(), 3, header, options)
    assert stats["targets"]["entity_located_by"] == {"gold": 1, "not located": 1, "prefix-pattern": 1}
    assert stats["finding_4"]["n"] == 2 and stats["finding_4"]["n_not_located"] == 1
    assert (stats["finding_4"]["n_right"], stats["finding_4"]["n_wrong"]) == (1, 1)
    assert stats["per_layer"]["constraint_to_last"]["all"][0]["n"] == 2
    shares = stats["per_layer"]["constraint_to_last_share"]["all"]
    assert abs(sum(c["value"] for c in shares) - 1) < 1e-5
    assert [c["band"] for c in stats["finding_2"]["bands"]] == [[b[0], b[-1]] for b in bands for _ in (1, 2)]
    assert [c["band"] for c in stats["finding_2"]["route"]] == [[b[0], b[-1]] for b in bands]


def band_cells(differences: list[list[float]], num_layers: int) -> list[dict]:
    """Band statistics as ``band_stats`` writes them, for per-question paired differences given per band."""
    from harness.bootstrap import keyed_rng
    from harness.results import mean_with_ci

    cells = []
    for band, values in zip(layer_bands(num_layers), differences):
        cell = mean_with_ci(values, keyed_rng(0, str(band[0])))
        zero = {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        cells.append({"band": [band[0], band[-1]], "k": 3, "n": len(values), "drop_top": cell,
                      "drop_random": zero, "difference": cell})
    return cells


def route_cells(shares: list[list[float]], num_layers: int) -> list[dict]:
    """Route statistics as ``route_stats`` writes them, for per-question shares of p lost given per band."""
    from harness.bootstrap import keyed_rng
    from harness.results import mean_with_ci

    cells = []
    for band, values in zip(layer_bands(num_layers), shares):
        cell = mean_with_ci(values, keyed_rng(0, "route", str(band[0])))
        cells.append({"band": [band[0], band[-1]], "n": len(values), "p_clean": cell, "p_cut": cell, "drop": cell,
                      "share": cell})
    return cells


def test_finding_2_rule_reads_the_earliest_band_whose_route_carries_the_answer():
    options = StudyOptions(band_ks=(3,))
    selectivity = band_cells([[0.0] * 6] * 3, 6)  # top-k no better than random anywhere: not the verdict
    early = route_cells([[0.9, 0.95, 0.85, 0.9, 1.0, 0.92], [0.0] * 6, [0.0] * 6], 6)
    assert finding_2(selectivity, early, 6, options)["verdict"] == "holds"
    assert finding_2(selectivity, early, 6, options)["earliest_route_band"] == [0, 1]
    late = route_cells([[0.0] * 6, [0.0] * 6, [0.9, 0.95, 0.85, 0.9, 1.0, 0.92]], 6)
    assert finding_2(selectivity, late, 6, options)["verdict"] == "does not hold"
    # A real but small dependence (the planted null's 3%) is below the margin: not a route that carries the answer.
    small = route_cells([[0.02, 0.04, 0.03, 0.01, 0.05, 0.03]] + [[0.0] * 6] * 2, 6)
    assert finding_2(selectivity, small, 6, options)["verdict"] == "does not hold"
    noisy = route_cells([[0.9, -0.4, 0.6, -0.3, 0.8, 0.0], [0.0] * 6, [0.0] * 6], 6)
    assert finding_2(selectivity, noisy, 6, options)["verdict"] == "inconclusive"
    few = route_cells([[0.9, 0.95], [0.0] * 2, [0.0] * 2], 6)
    assert finding_2(band_cells([[0.0] * 2] * 3, 6), few, 6, options)["verdict"] == "not tested"


def test_finding_2_selectivity_reads_the_earliest_band_with_top_k_above_random():
    options = StudyOptions(band_ks=(3,))
    route = route_cells([[0.0] * 6] * 3, 6)
    early = band_cells([[0.3, 0.4, 0.5, 0.35, 0.45, 0.4], [0.0] * 6, [0.0] * 6], 6)
    assert finding_2(early, route, 6, options)["earliest_band"] == [0, 1]
    noisy = band_cells([[0.3, -0.4, 0.2, -0.3, 0.1, -0.2], [0.0] * 6, [0.0] * 6], 6)
    assert finding_2(noisy, route, 6, options)["earliest_band"] is None
"""The specificity measures (neighbourhood, same subject, locality), the unrelated answers in edits.jsonl, and the
key position rule.

A tiny random LLaVA answers with 16-token "sentences", so an unchanged model
must score exactly 1.0 on all three measures even though its answers are long.
"""

from __future__ import annotations

import json

import pytest

from editing.metrics import Unrelated, extracted_answer, locality_measures
from editing.runner import EditOptions, run_editing


@pytest.fixture(scope="module")
def tiny_llava(tiny_model_dirs):
    from harness.models.loading import load_model

    return load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQA_CONSTRAINTS_CACHE", str(tmp_path / "cache"))


def test_a_no_op_edit_scores_one_on_every_specificity_measure(tiny_llava, planted_data_dir, tmp_path):
    options = EditOptions(methods=["ft"], track="insertion", layers=[1], limit=2, specificity_size=6,
                          max_new_tokens=16, method_options={"ft": {"steps": 0}}, neighbours=3, validation_size=2)
    document = run_editing(tiny_llava, str(planted_data_dir), tmp_path, options)
    result = document["methods"]["ft"]
    for key in ("same_subject", "locality", "locality_tokens"):
        assert result[key]["mean"] == pytest.approx(1.0), key
    # Nothing changed, so on a neighbour the edit's target is exactly as (un)likely as before the edit: the
    # neighbourhood score is the unedited model's own P(old) > P(new), measured on every neighbour.
    assert result["neighborhood"]["n"] == 2 and result["neighborhood"]["n_subjects"] == 2
    assert result["efficacy_magnitude"]["mean"] < 0  # the unedited model prefers its own answer
    lines = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    unrelated = lines[0]["unrelated"]
    assert len(unrelated) >= 4 and all(set(u) == {"id", "before", "after"} for u in unrelated)
    assert all(u["before"] == u["after"] for u in unrelated)
    assert any(len(u["before"].split()) > 3 for u in unrelated)  # sentence-length answers


def test_a_real_edit_is_measured_and_explained(tiny_llava, planted_data_dir, tmp_path):
    options = EditOptions(methods=["multedit", "multedit-cov", "ft-l"], track="insertion", layers=[1], limit=2,
                          specificity_size=6, key_position="auto", corpus_keys=300, validation_size=2, neighbours=3,
                          method_options={"multedit": {"steps": 5}, "multedit-cov": {"steps": 5},
                                          "ft-l": {"linf_rms": 0.1}})
    document = run_editing(tiny_llava, str(planted_data_dir), tmp_path, options)
    # auto: the most distinct key on the validation split's requests, and the output says so.
    table = document["choices"]["key_distinctness"]
    spills = {p: rows["1"]["predicted_spill"] for p, rows in table.items() if rows["1"] is not None}
    assert document["key_position"] == min(spills, key=spills.get)
    assert document["key_position_source"].startswith("least predicted spill at layer 1 on the validation split")
    assert document["choices"]["parameters"] == {}  # the config fixed FT-L's bound: nothing tuned
    stats = document["key_statistics"]
    assert stats["source"] == "corpus" and stats["layers"]["1"]["n_keys"] >= 300  # C from the generic corpus
    for name in ("multedit", "multedit-cov", "ft-l"):
        for key in ("specificity", "locality", "neighborhood", "same_subject", "efficacy_score"):
            assert 0.0 <= document["methods"][name][key]["mean"] <= 1.0
    bound = document["methods"]["ft-l"]["linf_bound"]
    assert bound["edit_operations"] == document["methods"]["ft-l"]["edits"]  # one at a time: one operation per edit
    assert 0 <= bound["edits_where_active"] <= bound["edit_operations"]
    assert set(document["methods"]["multedit"]["seconds_breakdown"]) == {"keys", "delta", "solve"}


def test_specificity_is_about_the_answer_entity():
    class Row:
        question = "What is the capital of the country whose flag is in this image?"
        answers = ["Kabul"]

    def state(answer):
        return Unrelated(answer, [1, 2, 3], -3.0, 3)

    rows = [Row()]
    # The same entity in another wording of the same sentence is unchanged...
    assert extracted_answer("The capital of Afghanistan is Kabul.", Row.question) == "afghanistan kabul"
    same = locality_measures(rows, [state("The capital of Afghanistan is Kabul.")],
                             [state("Capital of Afghanistan: Kabul")])
    assert same["locality"] == 1.0
    # ...a new entity is a change, even when the answer stays wrong or the format stays the same.
    moved = locality_measures(rows, [state("The capital of Afghanistan is Herat.")],
                              [state("The capital of Afghanistan is Kandahar.")])
    assert moved["locality"] == 0.0
    # EasyEdit's token locality reads the teacher-forced top-1 tokens.
    after = Unrelated("x", [1, 2, 9], -3.0 - 3 * 0.6931, 3)
    measured = locality_measures(rows, [state("x")], [after])
    assert measured["locality_tokens"] == pytest.approx(2 / 3)


def test_subject_kept_reads_only_answers_that_named_the_subject():
    from editing.metrics import Snapshot, edit_metrics
    from editing.requests import EditRequest

    request = EditRequest(id="r", question="What is the capital of the country whose flag is in this image?",
                          image=None, target="Praia", current="The capital of Cape Verde is Cape Town.",
                          subject="Cape Verde", relation="capital", track="insertion",
                          paraphrases=("Which city is the capital?", "Name the capital."))
    before = Snapshot("The capital of Cape Verde is Cape Town.",
                      ["The capital of Cape Verde is Cape Town.", "Cape Town."], [], -5.0)
    # The edited question now names the target for the right country; one paraphrase sees another country.
    after = Snapshot("The capital of Cape Verde is Praia.", ["The capital of Kenya is Nairobi.", "Praia."], [], -1.0)
    row = edit_metrics(request, before, after)
    assert row["efficacy"] == 1.0 and row["generalization"] == 0.5
    assert row["subject_kept"] == 0.5  # of the two answers that named Cape Verde, one still does
    assert row["efficacy_subject_kept"] == 1.0  # the edited question still names Cape Verde
    lost = Snapshot("The capital of Kenya is Praia.", ["Praia.", "Praia."], [], -1.0)
    moved = edit_metrics(request, before, lost)
    assert moved["efficacy"] == 1.0 and moved["efficacy_subject_kept"] == 0.0 and moved["subject_kept"] == 0.0
    bare = Snapshot("Cape Town", ["Cape Town", "Cape Town"], [], -5.0)  # a model that never names the subject
    assert edit_metrics(request, bare, Snapshot("Praia", ["Praia", "Praia"], [], -1.0))["subject_kept"] is None

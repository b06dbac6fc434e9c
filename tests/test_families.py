"""Every command on every supported family, on tiny checkpoints that reproduce each family's real quirks.

llava (Llama-2 SentencePiece tokenizer), llava_next (anyres tiles, newline rows, unpadding), qwen2_vl
(3-D M-RoPE positions), idefics3 (image splitting, a chat template that writes the BOS) and a text LM
(a Llama-3-style template that writes the BOS). On each: ``evaluate`` is batch-invariant, ``trace`` gives
the same numbers with both engines at every cell, ``attention`` runs, and every edit method restores the
weights bit for bit. The random heads are sharpened so that corruptions move p by far more than the
1e-4 tolerances.
"""

from __future__ import annotations

import json
import warnings

import pyarrow.parquet as pq
import pytest
import torch

from harness.models.loading import load_model
from harness.models.tiny import FAMILIES
from harness.tracing import causal_trace as ct
from vqa_constraints.errors import UserError

LIMIT = 2  # questions per command
CONFIG = "single_constraint"


@pytest.fixture(scope="module")
def family_adapter(tiny_model_dirs):
    cache = {}

    def get(family: str):
        if family not in cache:
            adapter = load_model(tiny_model_dirs(family), dtype="float32", device="cpu")
            with torch.no_grad():  # p ~ 1/V on a random head; sharpen it so effects are large
                adapter.model.get_output_embeddings().weight.mul_(40.0)
            cache[family] = adapter
        return cache[family]

    return get


@pytest.fixture(scope="module")
def records(planted_data_dir):
    from vqa_constraints.loading import load_split

    return list(load_split(str(planted_data_dir), CONFIG).records(4))


# --- prompts: one BOS, and the replacement word in context ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_one_bos_even_when_the_chat_template_writes_it(family_adapter, records, family):
    adapter = family_adapter(family)
    encoded = adapter.encode(records[0].question, records[0].image) if adapter.is_multimodal else adapter.encode(
        records[0].text_only_question)
    ids = encoded.input_ids[0].tolist()
    bos = adapter.tokenizer.bos_token_id
    if family in ("idefics3", "text"):  # their templates write the BOS and their tokenizers add one too
        assert encoded.prompt.startswith(adapter.tokenizer.bos_token)
    if family == "qwen2_vl":  # Qwen2 has no BOS
        assert bos not in ids
    else:
        assert ids[0] == bos and ids.count(bos) == 1


def test_llava_tokenizer_splits_a_leading_space_word_as_llama2_does(family_adapter):
    tokenizer = family_adapter("llava").tokenizer
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" Paris", add_special_tokens=False)["input_ids"])
    assert pieces == ["\u2581", "\u2581Paris"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_corruption_uses_the_word_not_a_space(family_adapter, family):
    adapter = family_adapter(family)
    token_id, text = ct.replacement_token(adapter.tokenizer, ct.DEFAULT_REPLACE_TOKEN)
    assert text.strip() == "Paris"
    encoded = adapter.encode("Is it Paris?") if family == "text" else None
    corruption = ct.make_corruption(adapter, "replace", [0], encoded, torch.zeros(1, 1, 8), seed=0, samples=1)
    assert corruption.replacement_id == token_id
    assert torch.equal(corruption.replacement, adapter.embed_tokens().weight[token_id])
    # Blank; and, for the SentencePiece families, a word whose piece in context is a bare "▁".
    for blank in (" ",) + (("\u2581",) if family in ("llava", "llava_next") else ()):
        with pytest.raises(UserError) as info:
            ct.replacement_token(adapter.tokenizer, blank)
        assert "\n" not in str(info.value)


# --- evaluate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_is_batch_invariant(family_adapter, planted_data_dir, records, tmp_path, family):
    adapter = family_adapter(family)
    if not adapter.is_multimodal:
        # `evaluate` refuses a text-only model on a visual benchmark; its scoring back-end serves text prompts.
        from harness.scoring import answer_logprobs, generate

        items = [(r, r.answers[0]) for r in records]
        one = generate(adapter, records, batch_size=1), answer_logprobs(adapter, items, batch_size=1)
        four = generate(adapter, records, batch_size=4), answer_logprobs(adapter, items, batch_size=4)
        assert [g.text for g in one[0]] == [g.text for g in four[0]]
        assert one[1] == pytest.approx(four[1], abs=1e-4)
        return
    from harness.evaluate import EvalOptions, evaluate

    samples = []
    for size in (1, 4):
        options = EvalOptions(model=str(adapter.name_or_path), data=str(planted_data_dir), out=tmp_path / f"b{size}",
                              configs=[CONFIG], limit=4, batch_size=size, scoring="both", progress=False,
                              show_table=False, device="cpu", dtype="float32")
        run = evaluate(options, adapter=adapter)
        samples.append([json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()])
    assert len(samples[0]) == len(samples[1]) == 4
    for a, b in zip(*samples):
        assert a["prediction"] == b["prediction"]
        assert a["gold_logprob"] == pytest.approx(b["gold_logprob"], abs=1e-4)
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)


# --- trace --------------------------------------------------------------------------------------


def _trace(adapter, data, out, corruption, engine, **extra):
    options = ct.TraceOptions(
        model=str(adapter.name_or_path), data=str(data), config=CONFIG, out=out, corruption=corruption,
        engine=engine, kinds=("hidden", "mlp", "attn"), limit=LIMIT, traced="all", noise_samples=2,
        text_only=not adapter.is_multimodal, bootstrap=10, progress=False, **extra,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plots of 3-layer models
        folder = ct.run_trace(options, adapter=adapter)
    stats = json.loads((folder / "trace_stats.json").read_text())
    return stats, pq.read_table(folder / "traces.parquet").to_pylist()


def _corruptions(family):
    return ("replace", "noise") if family == "text" else ct.CORRUPTIONS


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_engines_agree_at_every_cell(family_adapter, planted_data_dir, tmp_path, family):
    """Fails before the fixes on llava_next (shape mismatch: newline rows) and qwen2_vl (1-D positions)."""
    adapter = family_adapter(family)
    for corruption in _corruptions(family):
        fast_stats, fast = _trace(adapter, planted_data_dir, tmp_path / f"fast-{corruption}", corruption, "fast")
        ref_stats, ref = _trace(adapter, planted_data_dir, tmp_path / f"ref-{corruption}", corruption, "reference")
        assert fast_stats["counts"]["traced"] == LIMIT and fast
        assert fast_stats["counts"]["engines"] == {"fast": len({(r["id"], r["corrupted_index"]) for r in fast}),
                                                   "reference": 0}, "the fast engine fell back on this family"
        assert {r["engine"] for r in ref} == {"reference"}
        assert len(fast) == len(ref)
        moved = 0.0
        for f, r in zip(fast, ref):
            assert (f["id"], f["target"], f["kind"]) == (r["id"], r["target"], r["kind"])
            assert f["p_corrupt"] == pytest.approx(r["p_corrupt"], abs=1e-4)
            assert f["p_restored"] == pytest.approx(r["p_restored"], abs=1e-4)
            moved = max(moved, abs(r["p_clean"] - r["p_corrupt"]))
        assert moved > 1e-2, f"{corruption} must move p for the comparison to bite"
        if corruption == "replace":
            assert fast_stats["replacement"]["text"].strip() == "Paris"
            assert adapter.tokenizer.decode([fast_stats["replacement"]["token_id"]]).strip() == "Paris"
        else:
            assert fast_stats["replacement"] is None


def test_traced_correct_skips_wrong_answers_and_all_traces_them(family_adapter, planted_data_dir, tmp_path):
    adapter = family_adapter("llava")
    stats, rows = _trace(adapter, planted_data_dir, tmp_path / "correct", "noise", "fast", **{})
    assert stats["options"]["traced"] == "all" and stats["counts"]["traced"] == LIMIT and rows
    options = ct.TraceOptions(model="-", data=str(planted_data_dir), config=CONFIG, out=tmp_path / "c",
                              corruption="noise", kinds=("mlp",), limit=LIMIT, progress=False, bootstrap=10)
    ct.run_trace(options, adapter=adapter)  # a random model answers nothing right: nothing is traced
    correct = json.loads((tmp_path / "c" / "trace_stats.json").read_text())
    assert correct["options"]["traced"] == "correct"
    assert correct["counts"]["traced"] == 0 and correct["counts"]["skipped"]["wrong_answer"] == LIMIT
    with pytest.raises(UserError, match="--traced"):
        ct.TraceOptions(model="-", data="-", config=CONFIG, out=tmp_path, traced="some").check()


# --- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_runs(family_adapter, planted_data_dir, tmp_path, family):
    from harness.tracing.attention_study import StudyOptions, run_attention_study
    from vqa_constraints.loading import load_split

    adapter = family_adapter(family)
    split = load_split(str(planted_data_dir), CONFIG)
    options = StudyOptions(limit=LIMIT, top_k=2, draws=1, progress=False)
    if not adapter.is_multimodal:
        with pytest.raises(UserError, match="multimodal"):
            run_attention_study(adapter, split, tmp_path / "attn", options)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = run_attention_study(adapter, split, tmp_path / "attn", options)
    assert (tmp_path / "attn" / "attention_stats.json").exists()
    assert stats and json.loads((tmp_path / "attn" / "attention_stats.json").read_text())


# --- edit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["multedit", "ft", "ft-l"])
def test_edit_changes_the_weights_and_restores_them_bit_for_bit(family_adapter, records, family, method):
    from editing.methods import make_method, weights_hash
    from editing.requests import EditRequest

    adapter = family_adapter(family)
    record = records[0]
    question = record.question if adapter.is_multimodal else record.text_only_question
    constraint = record.constraints[0]
    request = EditRequest(
        id="r", question=question, image=record.image if adapter.is_multimodal else None, target="Tokyo",
        current="", subject=record.subject, relation="capital", track="insertion",
        key_span=(constraint.char_start, constraint.char_end) if adapter.is_multimodal else None,
    )
    before = weights_hash(adapter.model)
    handle = make_method(method, key_position="last", steps=2).apply(adapter, [request], [1])
    assert weights_hash(adapter.model) != before, f"{method} changed nothing"
    if method == "multedit":  # its delta steps continue a cached prefix on every family (editing/prefix_cache.py)
        assert handle.info["delta_forward"] == ["prefix-cached"]
        assert handle.info["delta_start_layers"] == [1], "the steps did not start at the edited layer"
    handle.restore()
    assert weights_hash(adapter.model) == before
    assert all(p.grad is None for p in adapter.model.parameters())

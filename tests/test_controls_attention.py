"""Ground-truth controls for the attention study (harness/zoo/planted/routed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import json

from harness.hooks import record_outputs
from harness.zoo import planted
from harness.zoo.planted.routed import QUICK_ROUTED, DampedRoute, RoutedRecipe, RouteMask, build_routed_into
from harness.zoo.cache import recipe_hash
from harness.zoo.planted.data import BatchMaker, fact_examples
from harness.zoo.planted.processor import build_tokenizer
from vqa_constraints.sources.planted_world import VISUAL_PHRASE


def untrained_smoke_model(entities: int, examples: int):
    """(model, tokenizer, batch): the planted smoke network, untrained, and a training batch of fact questions."""
    base = planted.QUICK_RECIPE
    world = planted.world_for(base)
    tokenizer = build_tokenizer(world.vocabulary())
    torch.manual_seed(0)
    model = planted.make_model(base, tokenizer).eval()
    maker = BatchMaker(world, tokenizer, planted.image_token_count(base))
    chosen = fact_examples(world, world.by_role("known")[:entities], text_only=False)[:examples]
    return model, tokenizer, maker.batch(chosen, np.random.default_rng(0))


def test_route_mask_leaves_the_image_to_the_constraint_tokens_in_early_layers():
    model, tokenizer, batch = untrained_smoke_model(entities=2, examples=3)
    route = RouteMask(open_layers=1)
    route.prepare(tokenizer)
    blocks = [layer.self_attn for layer in model.model.language_model.layers]
    names = {f"L{i}": b for i, b in enumerate(blocks)}
    with torch.no_grad(), route.context(model), record_outputs(names, index=1) as weights:
        route.before_forward(batch)
        model(**batch)
    ids = batch["input_ids"][0].tolist()
    image = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    phrase = route.phrase
    start = next(i for i in range(len(ids)) if ids[i : i + len(phrase)] == phrase)
    visual = list(range(start, start + len(phrase)))
    last = int(batch["attention_mask"][0].sum()) - 1
    other = [q for q in range(image[-1] + 1, last + 1) if q not in visual]
    assert len(visual) == 5 and other
    early, late = weights["L0"][0], weights["L1"][0]  # [heads, q, k]
    assert early[:, visual][:, :, image].min() > 0  # the constraint tokens read the image before layer 1 ...
    assert late[:, visual][:, :, image].abs().max() == 0  # ... and only then
    for w in (early, late):  # every other text token after the image never does
        assert w[:, other][:, :, image].abs().max() == 0
        assert torch.allclose(w[:, last].sum(-1), torch.ones(w.shape[0]), atol=1e-5)


def test_control_recipes_leave_the_planted_cache_key_alone():
    # the routed recipe wraps PlantedRecipe; the default planted model keeps its hash (no rebuild for anyone)
    assert recipe_hash(planted.DEFAULT_RECIPE) == "2e8def925db9"
    assert recipe_hash(RoutedRecipe()) != recipe_hash(planted.DEFAULT_RECIPE)
    assert QUICK_ROUTED.base == planted.QUICK_RECIPE



@pytest.fixture(scope="module")
def quick_routed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routed")
    build_routed_into(folder, QUICK_ROUTED, progress=False)
    return folder


def test_the_routed_build_is_a_stock_llava_that_records_its_routed_recipe(quick_routed):
    from transformers import LlavaForConditionalGeneration

    tmp_path = quick_routed
    accuracy = json.loads((tmp_path / planted.ACCURACY_FILE).read_text())
    assert accuracy["recipe"]["open_layers"] is None  # the routed recipe, not only its planted base
    assert accuracy["recipe"]["base"]["planted_layer"] == QUICK_ROUTED.base.planted_layer
    assert accuracy["training"]["open_layers"] == QUICK_ROUTED.base.planted_layer
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)  # no custom code, no mask
    assert model.config.zoo_recipe == accuracy["recipe"]
    assert 0 <= accuracy["single_constraint"]["accuracy"] <= 1  # scored without the mask, after saving


def test_the_enforced_route_is_the_training_route_in_every_forward(quick_routed, planted_data_dir):
    """The finding-2 control runs the routed model with its route enforced: a cached decoding step (fewer queries
    than keys) sees the same route as a full forward, and cutting the image from the constraint tokens in the
    layers the route already closes changes nothing, exactly."""
    from harness.models.loading import load_model
    from harness.tracing.knockout import next_token_probs
    from vqa_constraints.loading import load_split

    adapter = load_model(str(quick_routed), dtype="float32", device="cpu")
    record = next(iter(load_split(str(planted_data_dir), "single_constraint", "test").records(1)))
    encoded = adapter.encode(record.question, record.image)
    inputs = encoded.inputs
    route = RouteMask(open_layers=QUICK_ROUTED.base.planted_layer)
    blocks = [adapter.attention(l) for l in range(adapter.num_layers)]
    with torch.no_grad(), route.enforced(adapter.model, adapter.tokenizer):
        first = adapter.model(**inputs, use_cache=True)
        token = first.logits[:, -1].argmax(-1, keepdim=True)
        step = adapter.model(input_ids=token, cache=first.past_key_values,
                             attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1))
        whole = adapter.model(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], token], 1),
                                 "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)})
        assert torch.allclose(step.logits[:, -1], whole.logits[:, -1], atol=1e-5)
    with torch.no_grad():
        unrouted_first = adapter.model(**inputs).logits[:, -1]
    assert not torch.allclose(unrouted_first, first.logits[:, -1], atol=1e-4)  # the route is really applied
    phrase = route.phrase
    ids = inputs["input_ids"][0].tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(phrase)] == phrase)
    constraint = list(range(start, start + len(phrase)))
    with route.enforced(adapter.model, adapter.tokenizer):
        clean = next_token_probs(adapter.model, blocks, inputs)
        closed = range(route.open_layers, adapter.num_layers)
        cut_closed = next_token_probs(adapter.model, blocks, inputs, {t: encoded.image_positions for t in constraint},
                                      layers=closed)
        cut_open = next_token_probs(adapter.model, blocks, inputs, {t: encoded.image_positions for t in constraint},
                                    layers=range(route.open_layers))
    assert torch.equal(clean, cut_closed)
    assert not torch.equal(clean, cut_open)


def test_damped_route_scales_what_the_answer_reads_from_the_constraint_by_the_factor():
    """The finding-4 control's known cause of failure: positions after the visual-constraint phrase read it
    ``factor`` times less (the odds of a phrase token against the rest), positions before it are untouched."""
    model, tokenizer, batch = untrained_smoke_model(entities=1, examples=1)
    blocks = {f"L{i}": layer.self_attn for i, layer in enumerate(model.model.language_model.layers)}
    weights = {}
    for name, route in (("route", RouteMask(open_layers=1)), ("damped", DampedRoute(1, 0.01))):
        route.prepare(tokenizer)
        with torch.no_grad(), route.context(model), record_outputs(blocks, index=1) as recorded:
            route.before_forward(batch)
            model(**batch)
        weights[name] = recorded["L0"][0].double()  # layer 0: both runs see the same inputs
    ids = batch["input_ids"][0].tolist()
    phrase = tokenizer(VISUAL_PHRASE, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(phrase)] == phrase)
    visual = list(range(start, start + len(phrase)))
    last = int(batch["attention_mask"][0].sum()) - 1
    assert last > visual[-1]

    def odds(w, query):
        inside = w[:, query, visual].sum(-1)
        return inside / (w[:, query, : query + 1].sum(-1) - inside)

    for query in range(visual[-1] + 1, last + 1):
        assert torch.allclose(odds(weights["damped"], query), 0.01 * odds(weights["route"], query), rtol=1e-6)
    assert torch.equal(weights["damped"][:, : visual[-1] + 1], weights["route"][:, : visual[-1] + 1])


def test_mislabelled_questions_are_wrong_exactly_where_chosen(quick_routed, planted_data_dir, tmp_path):
    """The finding-4 null: a known random half scored wrong, the rest scored by the model's own answer, as the
    attention study generates it."""
    import pyarrow.parquet as pq

    from harness.models.loading import load_model
    from harness.study.controls import attention_run, mislabelled
    from harness.tracing.attention_study import StudyOptions
    from harness.scoring import answer_correct, normalize_answer
    from vqa_constraints.loading import load_split

    adapter = load_model(str(quick_routed), dtype="float32", device="cpu")
    split = load_split(str(planted_data_dir), "single_constraint", "test")
    route = QUICK_ROUTED.route()
    relabelled = mislabelled(adapter, split, 10, route)
    golds = [r.answers for r in relabelled.records()]
    assert len(golds) == 10 and relabelled.fingerprint != split.fingerprint
    out = attention_run(adapter, relabelled, tmp_path / "study", StudyOptions(limit=10, draws=1, progress=False),
                        route)
    rows = pq.read_table(out / "attention_examples.parquet").to_pylist()
    wrong = [not answer_correct(r["prediction"], gold) for r, gold in zip(rows, golds)]
    assert [r["correct"] for r in rows] == [not w for w in wrong]
    assert sum(1 for r, gold in zip(rows, golds) if gold[0] != r["prediction"].strip()) == 5
    assert all(normalize_answer(r["prediction"]) == "" or r["correct"]
               for r, gold in zip(rows, golds) if gold[0] == r["prediction"].strip())

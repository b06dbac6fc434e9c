"""Ground-truth controls for the attention study (harness/zoo/planted/routed.py)."""

from __future__ import annotations

import numpy as np
import torch

import json

from harness.hooks import record_outputs
from harness.zoo import planted
from harness.zoo.planted.routed import QUICK_ROUTED, RoutedRecipe, RouteMask, build_routed_into
from harness.zoo.cache import recipe_hash
from harness.zoo.planted.data import BatchMaker, fact_examples
from harness.zoo.planted.processor import build_tokenizer


def test_route_mask_leaves_the_image_to_the_constraint_tokens_in_early_layers():
    base = planted.QUICK_RECIPE
    world = planted.world_for(base)
    tokenizer = build_tokenizer(world.vocabulary())
    torch.manual_seed(0)
    model = planted.make_model(base, tokenizer).eval()
    maker = BatchMaker(world, tokenizer, planted.image_token_count(base))
    examples = fact_examples(world, world.by_role("known")[:2], text_only=False)[:3]
    batch = maker.batch(examples, np.random.default_rng(0))
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



def test_the_routed_build_is_a_stock_llava_that_records_its_routed_recipe(tmp_path):
    from transformers import LlavaForConditionalGeneration

    build_routed_into(tmp_path, QUICK_ROUTED, progress=False)
    accuracy = json.loads((tmp_path / planted.ACCURACY_FILE).read_text())
    assert accuracy["recipe"]["open_layers"] is None  # the routed recipe, not only its planted base
    assert accuracy["recipe"]["base"]["planted_layer"] == QUICK_ROUTED.base.planted_layer
    assert accuracy["training"]["open_layers"] == QUICK_ROUTED.base.planted_layer
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)  # no custom code, no mask
    assert model.config.zoo_recipe == accuracy["recipe"]
    assert 0 <= accuracy["single_constraint"]["accuracy"] <= 1  # scored without the mask, after saving

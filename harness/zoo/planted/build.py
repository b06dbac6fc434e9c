"""The planted-knowledge LLaVA: a tiny genuine LlavaForConditionalGeneration whose
facts live in one known MLP layer K, the ground truth for tracing and editing.

Construction (see the README section on the planted model for measured numbers):
0. Phase 0 trains only the vision tower and projector, contrastively, so each
   image feature points at the input embedding of the pictured creature's
   name (no pass through the decoder, so it is cheap).
1. Phase 1 trains every weight on the "scaffold" creatures' facts (all
   relations, all paraphrases, the "visited ... in the <region>" questions)
   and on naming every creature, so the model learns to read images, route
   relations and tell all creatures apart.
2. Phase 2 freezes everything except layer K's MLP and trains the "known"
   creatures' facts, replaying phase-1 examples so phase-1 skills survive.
   The known facts can therefore only be stored in MLP K.
3. "longtail" creatures are only ever named: their facts are never taught
   (the encyclopedic config; the editing track inserts them).
Text-only teaching (name instead of picture) is a recipe switch, off by
default: with it phase 1 did not learn within the time budget.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import GenerationConfig

from harness.zoo.cache import cached_build
from harness.zoo.planted.evaluation import evaluate
from harness.zoo.planted.processor import build_processor, build_tokenizer
from harness.zoo.planted.recipe import (
    ACCURACY_FILE, BUILD_THREADS, DEFAULT_RECIPE, QUICK_RECIPE, ZOO_NAME, PlantedRecipe, world_for,
)
from harness.zoo.planted.train import Route, train


def build(recipe: PlantedRecipe = DEFAULT_RECIPE, out: Path | None = None, force: bool = False,
          progress: bool = True) -> Path:
    """The folder of the planted model for ``recipe``, built (or reused from the cache)."""
    return cached_build(ZOO_NAME, recipe, lambda folder: build_into(folder, recipe, progress), out, force=force)


def build_cli(args: argparse.Namespace) -> Path:
    recipe = QUICK_RECIPE if args.quick else DEFAULT_RECIPE
    recipe = replace(recipe, world_seed=args.seed, seed=args.seed)
    return build(recipe, out=Path(args.out) if args.out else None, force=args.force)


def build_into(folder: Path, recipe: PlantedRecipe, progress: bool = True, route: Route | None = None,
               recorded: dict | None = None) -> None:
    """Train the model for ``recipe`` and save model, processor and accuracy into ``folder``.

    ``route`` trains under the routed control's attention mask (``routed.py``); ``recorded`` is the recipe written
    into the config and the accuracy file (default: ``recipe``'s fields)."""
    if not 0 <= recipe.planted_layer < recipe.layers:
        raise ValueError(f"planted_layer {recipe.planted_layer} outside 0..{recipe.layers - 1}")
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        _build_into(folder, recipe, progress, route, asdict(recipe) if recorded is None else recorded)
    finally:
        torch.set_num_threads(threads)


def _build_into(folder: Path, recipe: PlantedRecipe, progress: bool, route: Route | None, recorded: dict) -> None:
    world = world_for(recipe)
    tokenizer = build_tokenizer(world.vocabulary())
    processor = build_processor(tokenizer, recipe.patch_size)
    if route is not None:
        route.prepare(tokenizer)
    model, stats = train(recipe, world, tokenizer, progress, route)
    if route is not None:
        stats.update(route.stats())

    model.config.planted_layer = recipe.planted_layer
    model.config.zoo_recipe = recorded
    model.generation_config = GenerationConfig(
        max_new_tokens=8, do_sample=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)

    accuracy = evaluate(model, processor, world)  # the stock model: a route's mask is for training only
    accuracy.update({"planted_layer": recipe.planted_layer, "recipe": recorded, "training": stats})
    (folder / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2, sort_keys=True) + "\n")


def load_accuracy(folder: Path) -> dict:
    return json.loads((Path(folder) / ACCURACY_FILE).read_text())

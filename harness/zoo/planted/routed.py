"""Ground-truth controls for the attention study, built like the planted model (``harness.zoo.planted``).

Finding 2 (image -> visual-constraint tokens early, then constraint -> answer):

* positive, ``planted-routed``: the planted recipe trained under a per-layer attention mask (training only):
  text tokens after the image may not attend to the image tokens, except the visual-constraint tokens
  ("the creature in this image"), and those only in layers before the planted layer K. The answer can only
  travel image -> constraint tokens (layers < K) -> answer position. The saved model is a stock
  LlavaForConditionalGeneration; ``zoo_accuracy.json`` records its accuracy run without any mask.
* null: ``planted`` itself (its answer position reads the image directly).

The mask is written into each attention block's additive mask by a pre-hook (``harness.hooks.edit_kwargs``),
as the knockout does, so it can differ per layer; the blocks run eagerly while training.

Recipes are separate dataclasses holding a ``PlantedRecipe`` (so the default planted model's cache key is
unchanged) and are cached under their own zoo names.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import GenerationConfig

from harness.hooks import edit_kwargs
from harness.tracing.attention import eager_attention
from harness.tracing.knockout import _additive_mask
from harness.zoo.planted import model as planted_model
from harness.zoo.planted import recipe as planted
from harness.zoo.planted import train as planted_train
from harness.zoo.cache import cached_build
from harness.zoo.planted.data import BatchMaker, fact_examples, naming_examples
from harness.zoo.planted.evaluation import evaluate
from harness.zoo.planted.processor import build_processor, build_tokenizer
from vqa_constraints.sources.planted_world import VISUAL_PHRASE

ROUTED = "planted-routed"


@dataclass(frozen=True)
class RoutedRecipe:
    base: planted.PlantedRecipe = planted.DEFAULT_RECIPE
    # layers (0 .. open_layers-1) where the visual-constraint tokens may read the image; None: the planted layer K
    open_layers: int | None = None


DEFAULT_ROUTED = RoutedRecipe()
# `--quick` and the tests: the planted smoke network (2 layers, K = 1), a few steps.
QUICK_ROUTED = RoutedRecipe(base=planted.QUICK_RECIPE)


class RouteMask:
    """Per-layer masks for the batch being trained: ``set(input_ids)`` before each forward."""

    def __init__(self, image_token: int, phrase_ids: list[int], open_layers: int):
        self.image_token = image_token
        self.phrase = phrase_ids
        self.open_layers = open_layers
        self.cut_open = self.cut_closed = None

    def set(self, input_ids: torch.Tensor) -> None:
        ids = input_ids.tolist()
        batch, seq = input_ids.shape
        image = input_ids == self.image_token  # [B, K]
        after = torch.zeros(batch, seq, dtype=torch.bool)  # text queries after the image
        visual = torch.zeros(batch, seq, dtype=torch.bool)
        n = len(self.phrase)
        for row, tokens in enumerate(ids):
            where = [i for i, t in enumerate(tokens) if t == self.image_token]
            if where:
                after[row, where[-1] + 1:] = True
            for i in range(seq - n + 1):
                if tokens[i : i + n] == self.phrase:
                    visual[row, i : i + n] = True
        self.cut_closed = after[:, :, None] & image[:, None, :]  # [B, Q, K]
        self.cut_open = self.cut_closed & ~visual[:, :, None]

    def editor(self, layer: int):
        def edit(kwargs: dict) -> dict:
            cut = self.cut_open if layer < self.open_layers else self.cut_closed
            mask = _additive_mask(kwargs.get("attention_mask"), kwargs["hidden_states"])
            kwargs["attention_mask"] = mask.masked_fill(cut[:, None].to(mask.device), torch.finfo(mask.dtype).min)
            return kwargs

        return edit


def phrase_ids(tokenizer) -> list[int]:
    return tokenizer(VISUAL_PHRASE, add_special_tokens=False)["input_ids"]


def train_routed(recipe: RoutedRecipe, world, tokenizer, progress: bool = True):
    """``planted.train.train``'s phases 0-2 with the route mask on every language-model forward."""
    base = recipe.base
    torch.manual_seed(base.seed)
    model = planted_model.make_model(base, tokenizer)
    if base.silent_mlps_after_planted:
        planted_model.silence_mlps_after(model, base.planted_layer)
    maker = BatchMaker(world, tokenizer, planted.image_token_count(base))
    route = RouteMask(model.config.image_token_id, phrase_ids(tokenizer),
                      base.planted_layer if recipe.open_layers is None else recipe.open_layers)
    blocks = [layer.self_attn for layer in model.model.language_model.layers]
    scaffold = world.by_role("scaffold")[: base.phase1_fact_entities]
    scaffold_facts = fact_examples(world, scaffold, base.text_only)
    naming = naming_examples(world.entities)
    phase2 = fact_examples(world, world.by_role("known"), base.text_only)
    sampler = planted_train._sampler

    def masked_loss(draw):
        def loss_at(rng):
            batch = maker.batch(draw(rng), rng)
            route.set(batch["input_ids"])
            return model(**batch).loss
        return loss_at

    with planted_model.skipping_silent_mlps(model, base.planted_layer, base.silent_mlps_after_planted):
        loss0 = planted_train.align_vision(model, world, maker, tokenizer, base, progress)
        n_naming = int(round(base.batch * base.naming_fraction))
        facts_1, naming_1 = sampler(scaffold_facts, base.batch - n_naming), sampler(naming, n_naming)
        with eager_attention(model), edit_kwargs({b: route.editor(l) for l, b in enumerate(blocks)}):
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            loss1 = planted_train.optimise(trainable, masked_loss(lambda rng: facts_1(rng) + naming_1(rng)),
                                     base.phase1_steps, base.phase1_lr, base.seed * 2 + 1,
                                     "routed phase 1 (all weights)", progress)
            for param in model.parameters():
                param.requires_grad_(False)
            mlp_params = list(planted_model.planted_mlp(model, base.planted_layer).parameters())
            for param in mlp_params:
                param.requires_grad_(True)
            n_replay = int(round(base.batch * base.replay_fraction))
            n_replay_naming = int(round(n_replay * base.naming_fraction))
            new = sampler(phase2, base.batch - n_replay)
            replay_facts = sampler(scaffold_facts, n_replay - n_replay_naming)
            replay_naming = sampler(naming, n_replay_naming)
            loss2 = planted_train.optimise(mlp_params, masked_loss(lambda rng: new(rng) + replay_facts(rng) + replay_naming(rng)),
                                     base.phase2_steps, base.phase2_lr, base.seed * 2 + 2,
                                     f"routed phase 2 (MLP {base.planted_layer} only)", progress)
            model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return model, {"phase0_final_loss": round(loss0, 4), "phase1_final_loss": round(loss1, 4),
                   "phase2_final_loss": round(loss2, 4), "open_layers": route.open_layers}


def build_routed_into(folder: Path, recipe: RoutedRecipe, progress: bool = True) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(planted.BUILD_THREADS)
    try:
        base = recipe.base
        world = planted.world_for(base)
        tokenizer = build_tokenizer(world.vocabulary())
        processor = build_processor(tokenizer, base.patch_size)
        model, stats = train_routed(recipe, world, tokenizer, progress)
        model.config.planted_layer = base.planted_layer
        model.config.zoo_recipe = asdict(recipe)
        model.generation_config = GenerationConfig(
            max_new_tokens=8, do_sample=False, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        accuracy = evaluate(model, processor, world)  # stock model, no mask
        accuracy.update({"planted_layer": base.planted_layer, "recipe": asdict(recipe), "training": stats})
        (folder / planted.ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2, sort_keys=True) + "\n")
    finally:
        torch.set_num_threads(threads)


def build_routed(recipe: RoutedRecipe = DEFAULT_ROUTED, out: Path | None = None, force: bool = False,
                 progress: bool = True) -> Path:
    return cached_build(ROUTED, recipe, lambda folder: build_routed_into(folder, recipe, progress), out, force=force)


def build_cli(args: argparse.Namespace) -> Path:
    recipe = QUICK_ROUTED if args.quick else DEFAULT_ROUTED
    recipe = replace(recipe, base=replace(recipe.base, world_seed=args.seed, seed=args.seed))
    return build_routed(recipe, out=Path(args.out) if args.out else None, force=args.force)


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
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlavaForConditionalGeneration

from harness.zoo.cache import cached_build
from harness.zoo.llava_config import clip_llava_config, image_tokens_per_image
from harness.zoo.planted_data import BatchMaker, Example, fact_examples, naming_examples
from harness.zoo.planted_eval import evaluate
from harness.zoo.planted_processor import IMAGE_PLACEHOLDER, build_processor, build_tokenizer
from vqa_constraints.sources.planted_world import IMAGE_SIZE, PlantedWorld

ZOO_NAME = "planted"
ACCURACY_FILE = "zoo_accuracy.json"
# Builds run on a fixed number of CPU threads: float sums then happen in the same
# order every time (byte-identical weights for a recipe; another thread count
# gives slightly different weights). Two threads keep the build under 3 minutes
# on 2 cores; more would oversubscribe such a machine.
BUILD_THREADS = 2
VISION_TEMPERATURE = 10.0


@dataclass(frozen=True)
class PlantedRecipe:
    # the world (must match the dataset's planted source to score on it)
    world_seed: int = 0
    n_scaffold: int = 120
    n_known: int = 120
    n_longtail: int = 60
    # vision tower (CLIP) and projector
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    # language model (Llama)
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    intermediate: int = 512
    planted_layer: int = 2
    # MLPs after K output zero and never train, so nothing downstream can
    # store or re-derive the facts: the answer must come out of MLP K.
    silent_mlps_after_planted: bool = True
    tie_embeddings: bool = False
    # training
    seed: int = 0
    vision_steps: int = 300  # phase 0: align image features with the name embeddings
    vision_lr: float = 3e-3
    vision_batch: int = 128
    batch: int = 64
    phase1_fact_entities: int = 120  # scaffold creatures whose facts phase 1 teaches (fewer = faster routing)
    phase1_steps: int = 700
    phase1_lr: float = 1e-3
    phase2_steps: int = 300
    phase2_lr: float = 3e-3
    naming_fraction: float = 0.25  # share of each phase-1 batch that asks a creature's name
    replay_fraction: float = 0.5  # share of each phase-2 batch drawn from phase-1 examples
    # Also teach facts text-only (name instead of picture, no image). Off: with it
    # phase 1 had learnt almost nothing after 600-900 steps (see the README section on the planted model).
    text_only: bool = False


DEFAULT_RECIPE = PlantedRecipe()
# `--quick`: the same world, a smaller network and a few steps: a smoke build, not a good model.
QUICK_RECIPE = replace(
    DEFAULT_RECIPE, hidden=64, intermediate=128, layers=2, planted_layer=1,
    vision_steps=20, phase1_steps=20, phase2_steps=10,
)
# What the test suite builds (tests/conftest.py): it must be good enough to trace and edit.
TEST_RECIPE = DEFAULT_RECIPE


def build(recipe: PlantedRecipe = DEFAULT_RECIPE, out: Path | None = None, force: bool = False,
          progress: bool = True) -> Path:
    """The folder of the planted model for ``recipe``, built (or reused from the cache)."""
    return cached_build(ZOO_NAME, recipe, lambda folder: build_into(folder, recipe, progress), out, force=force)


def build_cli(args: argparse.Namespace) -> Path:
    recipe = QUICK_RECIPE if args.quick else DEFAULT_RECIPE
    recipe = replace(recipe, world_seed=args.seed, seed=args.seed)
    return build(recipe, out=Path(args.out) if args.out else None, force=args.force)


def world_for(recipe: PlantedRecipe) -> PlantedWorld:
    return PlantedWorld(recipe.world_seed, recipe.n_scaffold, recipe.n_known, recipe.n_longtail)


def image_token_count(recipe: PlantedRecipe) -> int:
    return image_tokens_per_image(IMAGE_SIZE, recipe.patch_size)


def make_model(recipe: PlantedRecipe, tokenizer) -> LlavaForConditionalGeneration:
    """A freshly initialised model (seeded by the caller)."""
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=recipe.tie_embeddings,
    )
    config = clip_llava_config(
        text_config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), image_size=IMAGE_SIZE,
        patch_size=recipe.patch_size, vision_hidden=recipe.vision_hidden, vision_layers=recipe.vision_layers,
        vision_heads=recipe.vision_heads, vision_intermediate=recipe.vision_intermediate,
    )
    return LlavaForConditionalGeneration(config)


def planted_mlp(model: LlavaForConditionalGeneration, layer: int) -> torch.nn.Module:
    return model.model.language_model.layers[layer].mlp


def silence_mlps_after(model: LlavaForConditionalGeneration, layer: int) -> None:
    """Zero and freeze the MLPs of every decoder layer after ``layer``."""
    for later in model.model.language_model.layers[layer + 1:]:
        torch.nn.init.zeros_(later.mlp.down_proj.weight)
        for param in later.mlp.parameters():
            param.requires_grad_(False)


class _ZeroMLP(torch.nn.Module):
    """What a silenced MLP computes (a zero ``down_proj`` and no bias give exact zeros), without the matmuls."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@contextmanager
def skipping_silent_mlps(model: LlavaForConditionalGeneration, layer: int, silent: bool):
    """Swap the silenced MLPs after ``layer`` for ``_ZeroMLP`` while training: the
    outputs are bit-identical and a phase-1 step is about 18% cheaper (measured).
    The saved model keeps its stock MLP modules."""
    layers = model.model.language_model.layers[layer + 1:] if silent else []
    originals = [decoder_layer.mlp for decoder_layer in layers]
    for decoder_layer in layers:
        decoder_layer.mlp = _ZeroMLP()
    try:
        yield
    finally:
        for decoder_layer, mlp in zip(layers, originals):
            decoder_layer.mlp = mlp


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def optimise(params, loss_at, steps: int, lr: float, seed: int, desc: str, progress: bool) -> float:
    """AdamW on ``params`` for ``steps`` steps of ``loss_at(rng)``; returns the last loss.

    Step ``i`` draws from ``np.random.default_rng([seed, i])``, so a phase's
    batches never depend on how many random numbers earlier steps used.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps))
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss = loss_at(np.random.default_rng([seed, step]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    return loss_value


def train_phase(model, params, maker: BatchMaker, draw, steps: int, lr: float, seed: int, desc: str,
                progress: bool) -> float:
    """Language-model loss on batches from ``draw(rng) -> examples``; returns the last loss."""
    model.train()
    loss = optimise(params, lambda rng: model(**maker.batch(draw(rng), rng)).loss, steps, lr, seed, desc, progress)
    model.eval()
    return loss


def _image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    features = model.model.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features)
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def align_vision(model, world: PlantedWorld, maker: BatchMaker, tokenizer, recipe: PlantedRecipe, progress: bool) -> float:
    """Phase 0: train the vision tower and projector so every image feature points
    towards the (frozen) input embedding of the pictured creature's name.

    A contrastive loss over all creatures' names, with no pass through the
    language model: cheap, and afterwards the decoder sees a picture much as it
    sees the name, so phase 1 only has to learn to use it.
    """
    names = torch.tensor(tokenizer.convert_tokens_to_ids([e.name for e in world.entities]))
    targets = torch.nn.functional.normalize(model.get_input_embeddings().weight[names].detach(), dim=-1)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())

    def contrastive_loss(rng):
        chosen = rng.integers(0, len(world.entities), size=recipe.vision_batch)
        pixels = torch.stack([maker.pixels(world.render_array(world.entities[i], rng)) for i in chosen])
        features = torch.nn.functional.normalize(_image_features(model, pixels), dim=-1)
        logits = VISION_TEMPERATURE * features @ targets.T  # images x tokens x names
        labels = torch.from_numpy(chosen).long()[:, None].expand(logits.shape[:2])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    return optimise(params, contrastive_loss, recipe.vision_steps, recipe.vision_lr, recipe.seed * 2,
                    "planted phase 0 (vision)", progress)


def _sampler(pool: list[Example], count: int):
    return lambda rng: [pool[i] for i in rng.integers(0, len(pool), size=count)]


def train(recipe: PlantedRecipe, world: PlantedWorld, tokenizer,
          progress: bool = True) -> tuple[LlavaForConditionalGeneration, dict]:
    """Phases 0-2 (see the module docstring)."""
    torch.manual_seed(recipe.seed)
    model = make_model(recipe, tokenizer)
    if recipe.silent_mlps_after_planted:
        silence_mlps_after(model, recipe.planted_layer)
    maker = BatchMaker(world, tokenizer, image_token_count(recipe))
    scaffold = world.by_role("scaffold")[: recipe.phase1_fact_entities]
    scaffold_facts = fact_examples(world, scaffold, recipe.text_only)
    naming = naming_examples(world.entities)
    phase2 = fact_examples(world, world.by_role("known"), recipe.text_only)

    with skipping_silent_mlps(model, recipe.planted_layer, recipe.silent_mlps_after_planted):
        loss0 = align_vision(model, world, maker, tokenizer, recipe, progress)
        model.train()
        n_naming = int(round(recipe.batch * recipe.naming_fraction))
        facts_1, naming_1 = _sampler(scaffold_facts, recipe.batch - n_naming), _sampler(naming, n_naming)
        trainable = [param for param in model.parameters() if param.requires_grad]
        loss1 = train_phase(model, trainable, maker, lambda rng: facts_1(rng) + naming_1(rng),
                            recipe.phase1_steps, recipe.phase1_lr, seed=recipe.seed * 2 + 1,
                            desc="planted phase 1 (all weights)", progress=progress)

        for param in model.parameters():
            param.requires_grad_(False)
        mlp_params = list(planted_mlp(model, recipe.planted_layer).parameters())
        for param in mlp_params:
            param.requires_grad_(True)
        n_replay = int(round(recipe.batch * recipe.replay_fraction))
        n_replay_naming = int(round(n_replay * recipe.naming_fraction))
        new = _sampler(phase2, recipe.batch - n_replay)
        replay_facts = _sampler(scaffold_facts, n_replay - n_replay_naming)
        replay_naming = _sampler(naming, n_replay_naming)
        loss2 = train_phase(model, mlp_params, maker, lambda rng: new(rng) + replay_facts(rng) + replay_naming(rng),
                            recipe.phase2_steps, recipe.phase2_lr, seed=recipe.seed * 2 + 2,
                            desc=f"planted phase 2 (MLP {recipe.planted_layer} only)", progress=progress)
    for param in model.parameters():
        param.requires_grad_(True)
    stats = {"phase1_examples": len(scaffold_facts) + len(naming), "phase2_examples": len(phase2),
             "phase0_final_loss": round(loss0, 4), "phase1_final_loss": round(loss1, 4), "phase2_final_loss": round(loss2, 4)}
    return model, stats


def build_into(folder: Path, recipe: PlantedRecipe, progress: bool = True) -> None:
    """Train the model for ``recipe`` and save model, processor and accuracy into ``folder``."""
    if not 0 <= recipe.planted_layer < recipe.layers:
        raise ValueError(f"planted_layer {recipe.planted_layer} outside 0..{recipe.layers - 1}")
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        _build_into(folder, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _build_into(folder: Path, recipe: PlantedRecipe, progress: bool) -> None:
    world = world_for(recipe)
    tokenizer = build_tokenizer(world.vocabulary())
    processor = build_processor(tokenizer, recipe.patch_size)
    model, stats = train(recipe, world, tokenizer, progress)

    model.config.planted_layer = recipe.planted_layer
    model.config.zoo_recipe = asdict(recipe)
    model.generation_config = GenerationConfig(
        max_new_tokens=8, do_sample=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)

    accuracy = evaluate(model, processor, world)
    accuracy.update({"planted_layer": recipe.planted_layer, "recipe": asdict(recipe), "training": stats})
    (folder / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2, sort_keys=True) + "\n")


def load_accuracy(folder: Path) -> dict:
    return json.loads((Path(folder) / ACCURACY_FILE).read_text())

"""Training the planted model: phase 0 (vision alignment), phase 1 (scaffold facts and naming), phase 2 (the
known facts, into MLP K only). Each phase's steps are reproducible from its seed."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from harness.zoo.planted.data import BatchMaker, Example, fact_examples, naming_examples
from harness.zoo.planted.model import make_model, planted_mlp, silence_mlps_after, skipping_silent_mlps
from harness.zoo.planted.recipe import VISION_TEMPERATURE, PlantedRecipe, image_token_count
from vqa_constraints.sources.planted_world import PlantedWorld


class Route(Protocol):
    """What the routed control adds to training (``harness.zoo.planted.routed.RouteMask``)."""

    label: str  # names the phases in the progress bars

    def prepare(self, tokenizer) -> None: ...  # before training: the token ids the mask needs

    def context(self, model) -> ContextManager: ...  # wraps phases 1 and 2

    def before_forward(self, batch: dict) -> None: ...

    def stats(self) -> dict: ...  # added to the training statistics


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
                progress: bool, before_forward: Callable[[dict], None] | None = None) -> float:
    """Language-model loss on batches from ``draw(rng) -> examples``; returns the last loss.
    ``before_forward(batch)`` runs before each forward (the routed control sets its attention mask there)."""

    def loss_at(rng):
        batch = maker.batch(draw(rng), rng)
        if before_forward is not None:
            before_forward(batch)
        return model(**batch).loss

    model.train()
    loss = optimise(params, loss_at, steps, lr, seed, desc, progress)
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


def train(recipe: PlantedRecipe, world: PlantedWorld, tokenizer, progress: bool = True,
          route: Route | None = None) -> tuple[LlavaForConditionalGeneration, dict]:
    """Phases 0-2 (see the module docstring); with ``route``, phases 1 and 2 run inside ``route.context(model)``
    and call ``route.before_forward(batch)`` before each forward (the routed control, ``routed.py``)."""
    torch.manual_seed(recipe.seed)
    model = make_model(recipe, tokenizer)
    if recipe.silent_mlps_after_planted:
        silence_mlps_after(model, recipe.planted_layer)
    maker = BatchMaker(world, tokenizer, image_token_count(recipe))
    scaffold = world.by_role("scaffold")[: recipe.phase1_fact_entities]
    scaffold_facts = fact_examples(world, scaffold, recipe.text_only)
    naming = naming_examples(world.entities)
    phase2 = fact_examples(world, world.by_role("known"), recipe.text_only)

    label = route.label if route else "planted"
    before_forward = route.before_forward if route else None
    with skipping_silent_mlps(model, recipe.planted_layer, recipe.silent_mlps_after_planted):
        loss0 = align_vision(model, world, maker, tokenizer, recipe, progress)
        with route.context(model) if route else nullcontext():
            loss1, loss2 = _phases_1_and_2(model, recipe, maker, scaffold_facts, naming, phase2, label,
                                           before_forward, progress)
    for param in model.parameters():
        param.requires_grad_(True)
    stats = {"phase1_examples": len(scaffold_facts) + len(naming), "phase2_examples": len(phase2),
             "phase0_final_loss": round(loss0, 4), "phase1_final_loss": round(loss1, 4), "phase2_final_loss": round(loss2, 4)}
    return model, stats


def _phases_1_and_2(model, recipe: PlantedRecipe, maker: BatchMaker, scaffold_facts, naming, phase2, label: str,
                    before_forward, progress: bool) -> tuple[float, float]:
    """Phase 1 (every weight, scaffold facts and naming), then phase 2 (MLP K only, known facts plus replay)."""
    n_naming = int(round(recipe.batch * recipe.naming_fraction))
    facts_1, naming_1 = _sampler(scaffold_facts, recipe.batch - n_naming), _sampler(naming, n_naming)
    trainable = [param for param in model.parameters() if param.requires_grad]
    loss1 = train_phase(model, trainable, maker, lambda rng: facts_1(rng) + naming_1(rng),
                        recipe.phase1_steps, recipe.phase1_lr, seed=recipe.seed * 2 + 1,
                        desc=f"{label} phase 1 (all weights)", progress=progress, before_forward=before_forward)

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
                        desc=f"{label} phase 2 (MLP {recipe.planted_layer} only)", progress=progress,
                        before_forward=before_forward)
    return loss1, loss2

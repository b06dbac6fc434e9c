"""The planted model's recipe and constants: the bottom of the folder (nothing of the model's own is imported
here, so model, train, evaluation and build all import downward)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from harness.zoo.llava_config import image_tokens_per_image
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


def world_for(recipe: PlantedRecipe) -> PlantedWorld:
    return PlantedWorld(recipe.world_seed, recipe.n_scaffold, recipe.n_known, recipe.n_longtail)


def image_token_count(recipe: PlantedRecipe) -> int:
    return image_tokens_per_image(IMAGE_SIZE, recipe.patch_size)

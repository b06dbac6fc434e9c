"""flag-llava's recipes and the constants every other file of the model shares (the bottom of the folder: it
imports nothing of the model's own, so train, evaluation, vqa, stage2 and build all import downward)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from harness.zoo.llava_config import image_tokens_per_image
from vqa_constraints.sources.flags import load_countries as load_all_countries

# Appended to every question: keeps the untuned model's answers short enough to score.
SUFFIX = " Answer in a few words."


NAME = "flag-llava"


IMAGE_TOKEN = "<image>"


SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


ACCURACY_FILE = "zoo_accuracy.json"


# SmolLM2's ChatML format; the image(s) of a turn come before its text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class FlagLlavaRecipe:
    """Everything that determines the built model (its hash names the cache folder)."""

    seed: int = 0
    num_countries: int = 0  # 0: every country of the flags source; else the first N by name
    image_size: int = 64
    patch_size: int = 16  # (64 / 16)^2 = 16 image tokens
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    # What the image tokens are regressed onto, right-aligned behind " " filler. Only
    # the name: constant words would land on different slots for names of other lengths.
    target_text: str = " {name}"
    stage1_steps: int = 8000
    stage1_batch: int = 64
    stage1_lr: float = 3e-3
    stage1_cosine: float = 1.0  # weight of (1 - per-token cosine), which the name slots need most
    stage1_contrastive: float = 0.0  # weight of an across-countries term (not needed with the cosine term)
    stage2_steps: int = 0
    stage2_batch: int = 8
    stage2_lr: float = 1e-4
    augment_strength: float = 1.0
    heldout_views: int = 2  # held-out augmented views per country (feature-match accuracy)
    eval_countries: int = 0  # generation metrics on the first N countries (0: all)
    eval_region: bool = False  # also ask for the continent (two more generation passes)
    # With an image SmolLM2 often restates the question before answering
    # ("The capital of the country whose flag is in this image is Kabul.").
    eval_max_new_tokens: int = 24
    version: int = 2  # bump when the build code changes what it makes


STAGE1_RECIPE = FlagLlavaRecipe()


STAGE1_SMOKE_RECIPE = FlagLlavaRecipe(
    num_countries=12,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=2,
    stage1_steps=100,
    stage1_batch=32,
    stage2_steps=1,
    stage2_batch=4,
    heldout_views=1,
    eval_countries=12,
    eval_max_new_tokens=6,
)


@dataclass(frozen=True)
class FlagLlavaStage2Recipe:
    """LLaVA's stage 2 (visual instruction tuning) on top of a stage-1 model.

    Its own dataclass so that stage-1 recipes hash as before; ``stage1`` is part
    of this hash, so the cache key is the stage-1 recipe plus the stage-2 one.
    """

    stage1: FlagLlavaRecipe = STAGE1_RECIPE
    seed: int = 0  # the training/held-out split of the countries and the order of the questions
    train_fraction: float = 0.7
    steps: int = 56
    batch: int = 12
    text_per_batch: int = 3  # of each batch, questions with the country named (the rest: flag images)
    lm_lr: float = 2e-5
    projector_lr: float = 1e-4
    warmup: int = 10
    targets: str = "sentence"  # "sentence": "The capital of X is Y."; "direct": "Y."
    replay: bool = False  # text questions answered with the untuned model's own answers
    eval_max_new_tokens: int = 24  # the untuned model often restates the question first
    version: int = 1  # bump when the stage-2 code changes what it makes


DEFAULT_RECIPE = FlagLlavaStage2Recipe()


SMOKE_RECIPE = FlagLlavaStage2Recipe(stage1=STAGE1_SMOKE_RECIPE, steps=2, batch=4, text_per_batch=1, warmup=1,
                                     eval_max_new_tokens=8)


# Bare answers, kept from wiping out what the language model knows by replaying its own text answers.
DIRECT_RECIPE = replace(DEFAULT_RECIPE, targets="direct", replay=True)


# Named recipes: (full, smoke) for `vqa-constraints zoo build NAME [--quick]`.
RECIPES = {
    NAME: (DEFAULT_RECIPE, SMOKE_RECIPE),
    f"{NAME}-stage1": (STAGE1_RECIPE, STAGE1_SMOKE_RECIPE),
    f"{NAME}-direct": (DIRECT_RECIPE, replace(SMOKE_RECIPE, targets="direct", replay=True)),
}


def load_countries(recipe: FlagLlavaRecipe):
    countries = load_all_countries()
    return countries[: recipe.num_countries] if recipe.num_countries else countries


def num_image_tokens(recipe: FlagLlavaRecipe) -> int:
    return image_tokens_per_image(recipe.image_size, recipe.patch_size)


def num_image_tokens_from_processor(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image into (its own rule)."""
    crop = processor.image_processor.crop_size
    count = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    count += processor.num_additional_image_tokens
    return count - 1 if processor.vision_feature_select_strategy == "default" else count

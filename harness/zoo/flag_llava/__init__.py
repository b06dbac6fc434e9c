"""flag-llava: a LLaVA on the real, pretrained SmolLM2-135M-Instruct, trained in LLaVA's two stages.

Files, bottom first: ``recipe`` (recipes, constants), ``augment`` (flag views), ``train`` (stage 1 and the
shared training steps), ``vqa`` (stage 2's questions), ``evaluation``, ``stage2`` (visual instruction tuning),
``build`` (assembly, cache, the zoo entry). The names below are the model's public face.
"""

from harness.zoo.flag_llava.build import build, build_cli
from harness.zoo.flag_llava.recipe import (
    ACCURACY_FILE, DEFAULT_RECIPE, DIRECT_RECIPE, NAME, RECIPES, SMOKE_RECIPE, STAGE1_RECIPE, STAGE1_SMOKE_RECIPE,
    FlagLlavaRecipe, FlagLlavaStage2Recipe, load_countries, num_image_tokens, num_image_tokens_from_processor,
)

__all__ = [
    "ACCURACY_FILE", "DEFAULT_RECIPE", "DIRECT_RECIPE", "NAME", "RECIPES", "SMOKE_RECIPE", "STAGE1_RECIPE",
    "STAGE1_SMOKE_RECIPE", "FlagLlavaRecipe", "FlagLlavaStage2Recipe", "build", "build_cli", "load_countries",
    "num_image_tokens", "num_image_tokens_from_processor",
]

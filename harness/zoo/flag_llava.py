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
rest are held out and scored (``flag_llava_stage2``). ``flag-llava-direct`` is
the same with bare answers and replay of the model's own text answers.

Every build is a genuine ``LlavaForConditionalGeneration`` + ``LlavaProcessor``
saved with ``save_pretrained`` (safetensors), cached by recipe hash.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from harness.zoo import cache, smollm2
from vqa_constraints.errors import UserError

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


def build(recipe: FlagLlavaRecipe | FlagLlavaStage2Recipe = DEFAULT_RECIPE, out: Path | None = None,
          force: bool = False) -> Path:
    """The folder of the flag-llava model for ``recipe`` (built once, then reused from the cache).

    A stage-2 recipe reuses (or first builds) its stage-1 model; ``force`` rebuilds only the stage named.
    """
    smollm2.gguf_path()  # fail early, with the install hint, before any work
    _require_flags()
    if isinstance(recipe, FlagLlavaStage2Recipe):
        from harness.zoo import flag_llava_stage2

        if recipe.targets not in ("sentence", "direct"):
            raise UserError(f"flag-llava: unknown stage-2 targets {recipe.targets!r} (sentence or direct)")
        stage1_folder = build(recipe.stage1)

        def make(folder: Path) -> None:
            flag_llava_stage2.build_into(recipe, stage1_folder, folder)

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
    import importlib.util

    if importlib.util.find_spec("flagpy") is None:
        raise UserError("flag-llava needs the flag images of the package flagpy: install it with `pip install --no-deps flagpy`")


def load_countries(recipe: FlagLlavaRecipe):
    from vqa_constraints.sources.flags import load_countries as load_all

    countries = load_all()
    return countries[: recipe.num_countries] if recipe.num_countries else countries


# --- assembly -------------------------------------------------------------------


def make_processor(tokenizer, recipe: FlagLlavaRecipe):
    """A ``LlavaProcessor``: CLIP image processor + SmolLM2 tokenizer with an added ``<image>`` token."""
    from transformers import CLIPImageProcessor, LlavaProcessor

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


def num_image_tokens(recipe: FlagLlavaRecipe) -> int:
    from harness.zoo.llava_config import image_tokens_per_image

    return image_tokens_per_image(recipe.image_size, recipe.patch_size)


def num_image_tokens_from_processor(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image into (its own rule)."""
    crop = processor.image_processor.crop_size
    count = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    count += processor.num_additional_image_tokens
    return count - 1 if processor.vision_feature_select_strategy == "default" else count


def make_model(language_model, tokenizer, recipe: FlagLlavaRecipe):
    """``LlavaForConditionalGeneration`` with SmolLM2's weights and a fresh vision tower + projector."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    from harness.zoo.llava_config import clip_llava_config

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
    from importlib.metadata import PackageNotFoundError, version

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
    import transformers

    from harness.zoo import flag_llava_eval, flag_llava_train

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
    training = flag_llava_train.train(model, processor, countries, recipe)
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
    accuracy = flag_llava_eval.evaluate(model, processor, countries, recipe)
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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

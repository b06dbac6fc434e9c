"""flag-llava stage 2, LLaVA's visual instruction tuning, started from the cached stage-1 model.

The projector and every language-model layer are trained (embeddings, LM head
and vision tower stay frozen) on short VQA about the training countries
(``vqa.plan``), loss on the answer tokens only. The held-out
countries are scored before and after tuning, from the flag and with the
country named, and written to ``zoo_accuracy.json``; their names go into the
checkpoint's ``config.json`` (``vqa_constraints.heldout_countries``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor, LlavaForConditionalGeneration

from harness.zoo import cache
from harness.zoo.flag_llava import evaluation, vqa
from harness.zoo.flag_llava.augment import flags_tensor
from harness.zoo.flag_llava.evaluation import chat_prompt, generate
from harness.zoo.flag_llava.recipe import ACCURACY_FILE, NAME, load_countries
from harness.zoo.flag_llava.train import answer_loss, chat_batch, cpu_seconds, pixels, schedule


def build_into(recipe, stage1_folder: Path, folder: Path) -> None:
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration.from_pretrained(stage1_folder, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(stage1_folder)
    countries = load_countries(recipe.stage1)
    training, heldout = vqa.split(len(countries), recipe.train_fraction, recipe.seed)
    held = [countries[i] for i in heldout]
    timings = {"load_seconds": round(time.perf_counter() - wall0, 1)}

    eval0 = time.perf_counter()
    # Before tuning: what SmolLM2 knows (country named), and the capital from the image for context.
    before = evaluation.heldout_accuracy(model, processor, held, recipe.stage1, recipe.eval_max_new_tokens,
                                              image=("capital",), recognition=False)
    batches = vqa.plan(countries, recipe)
    if recipe.replay:
        batches = _replay_targets(model, processor, batches, recipe.eval_max_new_tokens)
    timings["eval_before_wall_seconds"] = round(time.perf_counter() - eval0, 1)

    train0, train_cpu0 = time.perf_counter(), cpu_seconds()
    training_log = train(model, processor, countries, batches, recipe)
    timings["train_wall_seconds"] = round(time.perf_counter() - train0, 1)
    timings["train_cpu_seconds"] = round(cpu_seconds() - train_cpu0, 1)

    model.eval()
    stage1_config = json.loads((stage1_folder / "config.json").read_text())
    model.config.zoo_name = NAME
    model.config.zoo_recipe = asdict(recipe)
    model.config.zoo_recipe_hash = cache.recipe_hash(recipe)
    model.config.zoo_stage1_recipe_hash = stage1_config["zoo_recipe_hash"]
    model.config.zoo_base_language_model = stage1_config["zoo_base_language_model"]
    # What the harness reads to score only questions no stage-2 example touched.
    model.config.vqa_constraints = {
        "heldout_countries": [c.name for c in held],
        "training_countries": [countries[i].name for i in training],
        "stage2_targets": recipe.targets,
    }
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)

    eval0 = time.perf_counter()
    after = evaluation.heldout_accuracy(model, processor, held, recipe.stage1, recipe.eval_max_new_tokens)
    trained = [countries[i] for i in training]
    # Capital from the image on the training countries: how much stage 2 taught them outright.
    seen = evaluation.heldout_accuracy(model, processor, trained, recipe.stage1, recipe.eval_max_new_tokens,
                                            image=("capital",), named=(), recognition=False)
    timings["eval_after_wall_seconds"] = round(time.perf_counter() - eval0, 1)
    timings["total_wall_seconds"] = round(time.perf_counter() - wall0, 1)
    timings["total_cpu_seconds"] = round(cpu_seconds() - cpu0, 1)
    timings["torch_threads"] = torch.get_num_threads()
    stage1_report = json.loads((stage1_folder / ACCURACY_FILE).read_text())
    report = {
        "model": NAME,
        "recipe": asdict(recipe),
        "recipe_hash": cache.recipe_hash(recipe),
        "stage1_recipe_hash": stage1_config["zoo_recipe_hash"],
        "num_countries": len(countries),
        "num_training_countries": len(training),
        "num_heldout_countries": len(heldout),
        "training": training_log,
        "heldout": evaluation.compare(before, after),
        "training_countries_after": {"capital_from_image": seen["capital"]["image"]},
        "timings": timings,
        "stage1_timings": stage1_report.get("timings", {}),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (folder / ACCURACY_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def _replay_targets(model, processor, batches, max_new_tokens):
    """Fill replayed text examples with the untuned model's own greedy answers (knowledge-preserving)."""

    open_items = sorted({e.question for batch in batches for e in batch if not e.target})
    outputs = generate(model, processor, [chat_prompt(processor, q, False) for q in open_items], None, max_new_tokens)
    own = dict(zip(open_items, outputs))
    return [[e if e.target else replace(e, target=own[e.question]) for e in batch] for batch in batches]


def trainable_parameters(model, recipe) -> list[dict]:
    """Optimizer groups: projector and language-model layers; embeddings, LM head and vision tower frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    layers = list(model.model.language_model.layers.parameters()) + list(model.model.language_model.norm.parameters())
    for parameter in projector + layers:
        parameter.requires_grad_(True)
    return [{"params": projector, "lr": recipe.projector_lr}, {"params": layers, "lr": recipe.lm_lr}]


def train(model, processor, countries, batches, recipe) -> dict:
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    flags = flags_tensor([c.flag for c in countries])
    groups = trainable_parameters(model, recipe)
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * schedule(step, len(batches), recipe.warmup)
        chat = chat_batch(processor, [(e.question, e.with_image, e.target) for e in batch])
        # Text-only rows simply hold no <image> run; the pixels pair with the image rows in order.
        index = torch.tensor([e.country for e in batch if e.with_image], dtype=torch.long)
        pixel_values = pixels(flags, index, recipe.stage1, generator, processor) if len(index) else None
        loss = answer_loss(model, chat, pixel_values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 5 == 0 or step == len(batches) - 1:
            print(f"flag-llava stage 2: step {step + 1}/{len(batches)} loss {losses[-1]:.3f}", flush=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    tail = losses[-5:]
    return {"steps": len(batches), "batch": recipe.batch, "first_loss": round(losses[0], 4),
            "last_loss": round(sum(tail) / len(tail), 4),
            "trained_parameters": sum(p.numel() for p in params)}

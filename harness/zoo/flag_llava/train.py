"""Training flag-llava stage 1: the vision tower and projector; SmolLM2 stays frozen.

Stage 1 needs no language-model pass: the image tokens are regressed onto the
language model's input embeddings of a short text naming the country.
The stage-1 recipe's optional "stage 2" is a caption loss through the frozen
language model, with logits only at the answer positions (``logits_to_keep``);
LLaVA-style visual instruction tuning, which trains the language model too,
is ``stage2``.
"""

from __future__ import annotations

import math
import resource

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.zoo.flag_llava.augment import flags_tensor, normalise, random_views
from harness.zoo.flag_llava.recipe import num_image_tokens, num_image_tokens_from_processor

RECOGNITION_QUESTIONS = (
    "What country's flag is this?",
    "Which country does this flag belong to?",
    "Name the country whose flag is shown.",
    "Whose national flag is in this image?",
)
CAPTION = "This is the flag of {name}."
HELDOUT_SEED_OFFSET = 10_000  # held-out views come from a generator no training step uses


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, image tokens, text hidden): the projected features the language model sees."""
    output = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    features = output.pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def target_embeddings(model, tokenizer, countries, recipe) -> torch.Tensor:
    """(countries, image tokens, hidden): embeddings of ``recipe.target_text``, right-aligned behind spaces."""
    slots = num_image_tokens(recipe)
    filler = tokenizer(" ", add_special_tokens=False).input_ids[-1]
    rows = []
    for country in countries:
        ids = tokenizer(recipe.target_text.format(name=country.name), add_special_tokens=False).input_ids
        if len(ids) > slots:
            raise ValueError(f"target text for {country.name!r} needs {len(ids)} tokens; the image has {slots}")
        rows.append([filler] * (slots - len(ids)) + ids)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(torch.tensor(rows)).detach().clone()


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pixels(flags, index, recipe, generator, processor, strength=None):
    views = random_views(
        flags, index, recipe.image_size, generator, recipe.augment_strength if strength is None else strength
    )
    ip = processor.image_processor
    return normalise(views, ip.image_mean, ip.image_std)


def train(model, processor, countries, recipe) -> dict:
    """Train in place; return the training log (losses, held-out feature-match accuracy)."""
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    flags = flags_tensor([c.flag for c in countries])
    targets = target_embeddings(model, processor.tokenizer, countries, recipe)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    model.train()
    log = {"stage1": _stage1(model, processor, flags, targets, trainable, recipe, generator)}
    log["stage2"] = _stage2(model, processor, countries, flags, trainable, recipe, generator)
    model.eval()
    log["heldout_feature_match_accuracy"] = feature_match_accuracy(model, processor, flags, targets, recipe)
    return log


def _stage1(model, processor, flags, targets, trainable, recipe, generator) -> dict:
    count = flags.shape[0]
    # Similarities on targets centred across countries: the shared filler
    # slots would otherwise make every country look alike.
    centre = targets.mean(0, keepdim=True)
    flat_targets = F.normalize((targets - centre).flatten(1), dim=-1)
    scale = targets.pow(2).mean()
    optimizer = torch.optim.AdamW(trainable, lr=recipe.stage1_lr, weight_decay=0.01)
    warmup = max(1, recipe.stage1_steps // 20)
    losses = []
    bar = tqdm(range(recipe.stage1_steps), desc="flag-llava stage 1 (regress onto name embeddings)")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = recipe.stage1_lr * schedule(step, recipe.stage1_steps, warmup)
        index = torch.randint(count, (recipe.stage1_batch,), generator=generator)
        features = image_features(model, pixels(flags, index, recipe, generator, processor))
        target = targets[index]
        regression = (features - target).pow(2).mean() / scale
        cosine = 1.0 - F.cosine_similarity(features, target, dim=-1).mean()
        loss = regression + recipe.stage1_cosine * cosine
        if recipe.stage1_contrastive:
            similarity = F.normalize((features - centre).flatten(1), dim=-1) @ flat_targets.T
            loss = loss + recipe.stage1_contrastive * F.cross_entropy(similarity / 0.05, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            bar.set_postfix(regression=f"{float(regression.detach()):.3f}", cosine=f"{float(cosine.detach()):.3f}")
    return {"steps": recipe.stage1_steps, "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)}


def _caption_batch(processor, countries, index, generator):
    """Recognition questions answered with the caption (the old recipe's stage 2)."""
    items = []
    for i in index.tolist():
        question = RECOGNITION_QUESTIONS[int(torch.randint(len(RECOGNITION_QUESTIONS), (1,), generator=generator))]
        items.append((question, True, CAPTION.format(name=countries[i].name)))
    return chat_batch(processor, items)


def chat_batch(processor, items):
    """Left-padded chat sequences for ``(question, with_image, answer)`` items.

    Returns ``(input_ids, attention, position_ids, labels, keep)``: labels cover
    only the last ``keep`` positions (the longest answer and its ``<|im_end|>``),
    marking the answer tokens, so the loss needs logits there only.
    """
    tokenizer = processor.tokenizer
    image_run = processor.image_token * num_image_tokens_from_processor(processor)
    sequences, answer_lengths = [], []
    for question, with_image, answer in items:
        content = [{"type": "image"}, {"type": "text", "text": question}] if with_image else question
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt.replace(processor.image_token, image_run), add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
        sequences.append(prompt_ids + answer_ids)
        answer_lengths.append(len(answer_ids))
    length = max(len(s) for s in sequences)
    keep = max(answer_lengths)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), keep), -100, dtype=torch.long)
    for row, (sequence, answer_length) in enumerate(zip(sequences, answer_lengths)):
        input_ids[row, length - len(sequence):] = torch.tensor(sequence)
        attention[row, length - len(sequence):] = 1
        labels[row, keep - answer_length:] = torch.tensor(sequence[-answer_length:])
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, position_ids, labels, keep


def answer_loss(model, batch, pixel_values=None):
    """Cross-entropy on the answer tokens of a ``chat_batch``."""
    input_ids, attention, position_ids, labels, keep = batch
    # Logits at the last keep+1 positions: position t predicts token t+1.
    logits = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        pixel_values=pixel_values,
        logits_to_keep=keep + 1,
        use_cache=False,
    ).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def _stage2(model, processor, countries, flags, trainable, recipe, generator) -> dict:
    if recipe.stage2_steps <= 0:
        return {"steps": 0}
    optimizer = torch.optim.AdamW(trainable, lr=recipe.stage2_lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(recipe.stage2_steps), desc="flag-llava stage 2 (caption loss through frozen SmolLM2)")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = recipe.stage2_lr * schedule(step, recipe.stage2_steps, 1)
        index = torch.randint(flags.shape[0], (recipe.stage2_batch,), generator=generator)
        batch = _caption_batch(processor, countries, index, generator)
        loss = answer_loss(model, batch, pixels(flags, index, recipe, generator, processor))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {"steps": recipe.stage2_steps, "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4)}


@torch.no_grad()
def heldout_views(flags, recipe, views_per_country: int):
    """(index, views in [0, 1]) of held-out augmented views, the same for every call."""
    generator = torch.Generator().manual_seed(recipe.seed + HELDOUT_SEED_OFFSET)
    index = torch.arange(flags.shape[0]).repeat(views_per_country)
    return index, random_views(flags, index, recipe.image_size, generator, recipe.augment_strength)


@torch.no_grad()
def feature_match_accuracy(model, processor, flags, targets, recipe) -> float:
    """Share of held-out views whose image tokens lie nearest their own country's target embeddings."""
    index, views = heldout_views(flags, recipe, recipe.heldout_views)
    ip = processor.image_processor
    features = torch.cat(
        [image_features(model, normalise(chunk, ip.image_mean, ip.image_std)) for chunk in views.split(128)]
    )
    centre = targets.mean(0, keepdim=True)
    similarity = F.normalize((features - centre).flatten(1), dim=-1) @ F.normalize((targets - centre).flatten(1), dim=-1).T
    return round(float((similarity.argmax(-1) == index).float().mean()), 4)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

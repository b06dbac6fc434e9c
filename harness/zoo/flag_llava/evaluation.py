"""What flag-llava gets right, measured by greedy generation through the saved model's own processor.

- recognition: names the country of held-out augmented flag views;
- capital / region from the image: needs recognition *and* SmolLM2's own knowledge;
- the same questions with the country named in text, and the bare completion
  "The capital of X is" (the language model alone, no image): what SmolLM2 knows.
"""

from __future__ import annotations

import re
import unicodedata

import torch

from harness.zoo.flag_llava import vqa
from harness.zoo.flag_llava.augment import flags_tensor, to_pil
from harness.zoo.flag_llava.recipe import SUFFIX
from harness.zoo.flag_llava.train import heldout_views

RECOGNITION_QUESTION = "What country's flag is this?" + SUFFIX
CAPITAL_IMAGE_QUESTION = "What is the capital of the country whose flag is in this image?" + SUFFIX
CAPITAL_TEXT_QUESTION = "What is the capital of {name}?" + SUFFIX
REGION_IMAGE_QUESTION = "On which continent is the country whose flag is in this image?" + SUFFIX
REGION_TEXT_QUESTION = "On which continent is {name}?" + SUFFIX
BARE_CAPITAL_PROMPT = "The capital of {name} is"


def normalise(text: str) -> str:
    """Lower case, accents and punctuation dropped, single spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.replace(".", "")).split())


def mentions(output: str, answers) -> bool:
    """Whether any accepted answer occurs, as whole words, in the generated text."""
    said = f" {normalise(output)} "
    return any(f" {normalise(a)} " in said for a in answers if normalise(a))


def region_answers(region: str) -> list[str]:
    return ["America", "North America", "South America"] if region == "Americas" else [region]


@torch.no_grad()
def generate(model, processor, prompts: list[str], images=None, max_new_tokens: int = 12, batch_size: int = 24) -> list[str]:
    """Greedy answers for rendered prompts (with one image each when ``images`` is given)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if images is None:
            inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            inputs = processor(images=images[start : start + batch_size], text=chunk, return_tensors="pt", padding=True)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def chat_prompt(processor, question: str, with_image: bool) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}] if with_image else question
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def _score(outputs, expected, questions) -> dict:
    hits = [mentions(o, e) for o, e in zip(outputs, expected)]
    examples = [{"question": q, "output": o, "expected": list(e)} for q, o, e in list(zip(questions, outputs, expected))[:3]]
    return {"accuracy": round(sum(hits) / max(1, len(hits)), 4), "correct": sum(hits), "n": len(hits), "examples": examples}


def evaluate(model, processor, countries, recipe) -> dict:
    """Accuracies (with a few example outputs) of the trained model; see the module docstring."""
    n_new = recipe.eval_max_new_tokens
    bare_countries = countries
    if recipe.eval_countries:
        countries = countries[: recipe.eval_countries]
    names = [[c.name, *c.aliases] for c in countries]
    flags = flags_tensor([c.flag for c in countries])
    index, views = heldout_views(flags, recipe, 1)
    view_images = to_pil(views)
    plain_images = [c.flag for c in countries]
    report = {}

    prompt = chat_prompt(processor, RECOGNITION_QUESTION, True)
    outputs = generate(model, processor, [prompt] * len(view_images), view_images, n_new)
    report["recognition_heldout_views"] = _score(outputs, [names[i] for i in index.tolist()], [RECOGNITION_QUESTION] * len(outputs))

    tasks = [("capital", CAPITAL_IMAGE_QUESTION, [[c.capital] for c in countries])]
    if recipe.eval_region:
        tasks.append(("region", REGION_IMAGE_QUESTION, [region_answers(c.region) for c in countries]))
    for key, question, answers in tasks:
        prompt = chat_prompt(processor, question, True)
        outputs = generate(model, processor, [prompt] * len(countries), plain_images, n_new)
        report[f"{key}_from_image"] = _score(outputs, answers, [question] * len(outputs))
        text_question = CAPITAL_TEXT_QUESTION if key == "capital" else REGION_TEXT_QUESTION
        questions = [text_question.format(name=c.name) for c in countries]
        outputs = generate(model, processor, [chat_prompt(processor, q, False) for q in questions], None, n_new)
        report[f"{key}_from_text"] = _score(outputs, answers, questions)

    # The language model alone on every country (the number to compare with ~26% measured before).
    prompts = [BARE_CAPITAL_PROMPT.format(name=c.name) for c in bare_countries]
    outputs = generate(model, processor, prompts, None, 6, batch_size=48)
    report["capital_bare_completion"] = _score(outputs, [[c.capital] for c in bare_countries], prompts)
    return report


# --- stage 2: held-out countries -----------------------------------------------------

EVAL_RELATIONS = ("capital", "region", "currency", "language")


def heldout_accuracy(model, processor, countries, stage1_recipe, max_new_tokens: int, image=EVAL_RELATIONS,
                     named=EVAL_RELATIONS, recognition: bool = True) -> dict:
    """``{relation: {"image": score, "named": score}}``: asked about the plain flag, or with the
    country named, for the relations listed; with ``recognition``, naming the plain flags
    ("image") and held-out augmented views ("views")."""
    report = {}
    for relation in dict.fromkeys((*image, *named)):
        asked = [c for c in countries if vqa.answers(c, relation)]
        gold = [vqa.answers(c, relation) for c in asked]
        report[relation] = {}
        if relation in image:
            question = vqa.question(relation, None)
            outputs = generate(model, processor, [chat_prompt(processor, question, True)] * len(asked),
                               [c.flag for c in asked], max_new_tokens)
            report[relation]["image"] = _score(outputs, gold, [question] * len(asked))
        if relation in named:
            questions = [vqa.question(relation, c.name) for c in asked]
            outputs = generate(model, processor, [chat_prompt(processor, q, False) for q in questions], None,
                               max_new_tokens)
            report[relation]["named"] = _score(outputs, gold, questions)
    if recognition:
        gold = [vqa.answers(c, vqa.RECOGNITION) for c in countries]
        question = vqa.question(vqa.RECOGNITION, None)
        prompts = [chat_prompt(processor, question, True)] * len(countries)
        plain = generate(model, processor, prompts, [c.flag for c in countries], max_new_tokens)
        index, views = heldout_views(flags_tensor([c.flag for c in countries]), stage1_recipe, 1)
        viewed = generate(model, processor, prompts, to_pil(views), max_new_tokens)
        report[vqa.RECOGNITION] = {
            "image": _score(plain, gold, [question] * len(plain)),
            "views": _score(viewed, [gold[i] for i in index.tolist()], [question] * len(viewed)),
        }
    return report


def _ratio(numerator: dict, denominator: dict):
    return round(numerator["accuracy"] / denominator["accuracy"], 4) if denominator["accuracy"] else None


def compare(before: dict, after: dict) -> dict:
    """Held-out metrics per relation: before/after tuning, transfer_ratio and knowledge_retained.

    transfer_ratio = from the image after tuning / country named before tuning (what the
    language model knew); knowledge_retained = named after / named before.
    """
    table = {}
    for relation, scores in after.items():
        earlier = before.get(relation, {})
        row = {"n": next(iter(scores.values()))["n"], "before": earlier, "after": scores}
        for when, source in (("before", earlier), ("after", scores)):
            for kind, score in source.items():
                row[f"{kind}_{when}"] = score["accuracy"]
        if "named" in earlier:
            if "image" in scores:
                row["transfer_ratio"] = _ratio(scores["image"], earlier["named"])
            if "named" in scores:
                row["knowledge_retained"] = _ratio(scores["named"], earlier["named"])
        table[relation] = row
    return table

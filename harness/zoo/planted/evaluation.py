"""Greedy-generation accuracy of a planted model on the planted questions.

Questions come from the dataset's own `planted` source when it is installed
(``vqa_constraints.sources.planted.records``), otherwise they are derived
from the world the same way (view 0 of each entity). Every answer is produced
by ``model.generate`` through the real processor, as a user would run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from harness.models.prompting import fallback_prompt
from vqa_constraints.sources.planted import records
from vqa_constraints.sources.planted_world import (
    NAME_TEMPLATE,
    RELATIONS,
    VISUAL_PHRASE,
    PlantedWorld,
    question_for,
)

CONFIGS = ("single_constraint", "multi_constraint", "encyclopedic")
OTHER_VIEWS = (1, 2)  # extra dataset views scored for the single-constraint questions


@dataclass
class Question:
    config: str
    subject: str
    question: str
    answers: list[str]
    image: Image.Image
    paraphrases: list[str] = field(default_factory=list)
    text_only_question: str = ""
    other_views: list[Image.Image] = field(default_factory=list)


def dataset_questions(world: PlantedWorld) -> tuple[list[Question], str]:
    """The test-split questions of each planted config, and where they came from."""
    questions = [
        Question(r.config, r.subject, r.question, list(r.answers), r.image, list(r.paraphrases),
                 r.text_only_question, list(r.other_views))
        for r in records(world)
        if r.split == "test"
    ]
    return questions, "vqa_constraints.sources.planted"


@torch.no_grad()
def generate_answers(model, processor, items: list[tuple[str, Image.Image | None]], batch_size: int = 64) -> list[str]:
    """Greedy short answers for (question, image or None) pairs, in order."""
    answers: list[str] = [""] * len(items)
    tokenizer = processor.tokenizer
    for with_image in (True, False):
        indices = [i for i, (_, image) in enumerate(items) if (image is not None) == with_image]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [fallback_prompt(items[i][0], with_image=with_image)[0] for i in chunk]
            images = [items[i][1] for i in chunk] if with_image else None
            inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
            inputs = inputs.to(model.device)
            output = model.generate(
                **inputs, max_new_tokens=4, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = text.strip().lower()
    return answers


def _accuracy(model, processor, items: list[tuple[str, Image.Image | None, list[str]]]) -> dict:
    if not items:
        return {"accuracy": None, "n": 0}
    predictions = generate_answers(model, processor, [(q, image) for q, image, _ in items])
    correct = sum(p in {a.lower() for a in answers} for p, (_, _, answers) in zip(predictions, items))
    return {"accuracy": round(correct / len(items), 4), "n": len(items)}


def evaluate(model, processor, world: PlantedWorld) -> dict:
    """Accuracy per config, on paraphrases, other views, text-only, naming and phase-1 (scaffold) facts."""
    model.eval()
    questions, origin = dataset_questions(world)
    result: dict = {"questions_from": origin, "chance_single_answer": round(1 / len(next(iter(RELATIONS.values()))[0]), 4)}
    for config in CONFIGS:
        subset = [q for q in questions if q.config == config]
        result[config] = _accuracy(model, processor, [(q.question, q.image, q.answers) for q in subset])
        result[config]["paraphrases"] = _accuracy(
            model, processor, [(p, q.image, q.answers) for q in subset for p in q.paraphrases])
        result[config]["other_views"] = _accuracy(
            model, processor, [(q.question, v, q.answers) for q in subset for v in q.other_views])
        result[config]["text_only"] = _accuracy(
            model, processor, [(q.text_only_question, None, q.answers) for q in subset if q.text_only_question])
    naming = question_for(NAME_TEMPLATE, VISUAL_PHRASE)
    result["naming"] = {
        role: _accuracy(model, processor, [(naming, world.view(e, 0), [e.name]) for e in world.by_role(role)])
        for role in world.role_sizes
    }
    result["scaffold_facts"] = _accuracy(model, processor, [
        (question_for(templates[0], VISUAL_PHRASE), world.view(e, 0), [e.facts[relation]])
        for e in world.by_role("scaffold") for relation, (_, templates) in RELATIONS.items()
    ])
    return result

"""flag-llava stage 2 data: short VQA about flags, for the training countries only.

The countries are split once per seed: about 70% are asked about in stage 2,
the rest are held out (their flags were seen in stage 1, but never a question
about them), so answering them needs SmolLM2's own knowledge carried through
the image. Questions reuse the dataset's own relation templates, with the
visual constraint phrase for an image question and the country's name for a
text question.

Two target styles:
- "sentence": name the country, then answer ("The capital of Afghanistan is
  Kabul."): the model verbalises the bridge entity and keeps its knowledge;
- "direct": the bare answer ("Kabul."), which on its own makes a 135M model
  memorise the training countries; paired with replay of its own text answers.

``plan`` lays out every training example up front (no tensors), so a test can
read exactly what training will see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.zoo.flag_llava.recipe import SUFFIX
from harness.zoo.flag_llava.train import CAPTION, RECOGNITION_QUESTIONS
from vqa_constraints.sources.flag_questions import SINGLE_RELATIONS, VISUAL_PHRASE

RECOGNITION = "recognition"
FACT_RELATIONS = {r.name: r for r in SINGLE_RELATIONS if r.name in ("capital", "region", "currency", "language")}
# The relations of the image questions, in turn (capital x4, region x2, the rest once), interleaved so
# that even a few (smoke) questions cover every relation; the rest of a batch asks with the country named.
IMAGE_MIX = ("capital", "region", "currency", "language", RECOGNITION, "capital", "region", "capital", "capital")
SENTENCES = {
    RECOGNITION: CAPTION,
    "capital": "The capital of {name} is {answer}.",
    "region": "{name} is in {answer}.",
    "currency": "The currency of {name} is the {answer}.",
    "language": "In {name} people speak {answer}.",
}


@dataclass(frozen=True)
class Example:
    country: int  # index into the country list
    relation: str
    with_image: bool
    question: str  # without the chat template
    target: str  # the answer text (replay examples: filled in later from the model's own answer)


def split(num_countries: int, train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) country indices, each sorted; a seeded shuffle, independent of training."""
    order = torch.randperm(num_countries, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(num_countries * train_fraction)
    return sorted(order[:cut]), sorted(order[cut:])


def answers(country, relation: str) -> list[str]:
    """Accepted answers (empty: the source does not know it)."""
    if relation == RECOGNITION:
        return [country.name, *country.aliases]
    if relation == "region" and country.region == "Americas":
        return ["Americas", "America"]  # "North America", "South America" contain the word
    return [a for a in FACT_RELATIONS[relation].answers(country) if a]


def _joined(values: list[str]) -> str:
    values = values[:3]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def target(country, relation: str, style: str) -> str:
    found = answers(country, relation)
    # Several languages are all true at once; one currency (the first) is the country's own.
    answer = _joined(found) if relation == "language" else found[0]
    if style == "direct":
        return answer + "."
    return SENTENCES[relation].format(name=country.name, answer=answer)


def question(relation: str, subject: str | None, template: int = 0) -> str:
    """The question with the suffix; ``subject`` None asks about the flag in the image."""
    if relation == RECOGNITION:
        return RECOGNITION_QUESTIONS[template % len(RECOGNITION_QUESTIONS)] + SUFFIX
    templates = FACT_RELATIONS[relation].templates
    return templates[template % len(templates)].format(s=subject or VISUAL_PHRASE) + SUFFIX


def plan(countries, recipe) -> list[list[Example]]:
    """The stage-2 batches, in training order: image questions by IMAGE_MIX, then text questions."""
    generator = torch.Generator().manual_seed(recipe.seed)
    training, _ = split(len(countries), recipe.train_fraction, recipe.seed)
    pools = {rel: [i for i in training if answers(countries[i], rel)] for rel in (*FACT_RELATIONS, RECOGNITION)}
    text_relations = list(FACT_RELATIONS)

    def pick(sequence):
        return sequence[int(torch.randint(len(sequence), (1,), generator=generator))]

    batches, asked = [], 0
    for _ in range(recipe.steps):
        batch = []
        for slot in range(recipe.batch):
            with_image = slot < recipe.batch - recipe.text_per_batch
            # The mix runs on across batches, so small (smoke) batches still cover every relation.
            relation = IMAGE_MIX[asked % len(IMAGE_MIX)] if with_image else pick(text_relations)
            asked += with_image
            index = pick(pools[relation])
            template = int(torch.randint(8, (1,), generator=generator))
            subject = None if with_image else countries[index].name
            # Replayed text questions get the untuned model's own answer as target (filled in by the trainer).
            text = "" if (recipe.replay and not with_image) else target(countries[index], relation, recipe.targets)
            batch.append(Example(index, relation, with_image, question(relation, subject, template), text))
        batches.append(batch)
    return batches

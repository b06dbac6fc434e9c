"""Training examples for the planted model, and how a batch of them becomes tensors.

An example is (entity, question, answer, with_image). Image examples get a
fresh random view of the entity each time they are drawn (never one of the
dataset's views 0-9, which come from their own seeds), so accuracy on the
dataset measures recognition, not memorised pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.models.prompting import IMAGE_PLACEHOLDER, fallback_prompt
from harness.zoo.planted.processor import IMAGE_MEAN, IMAGE_STD
from vqa_constraints.sources.planted_world import (
    NAME_TEMPLATE,
    RELATIONS,
    VISITED_TEMPLATE,
    VISUAL_PHRASE,
    Entity,
    PlantedWorld,
    question_for,
    region_phrase,
)


@dataclass(frozen=True)
class Example:
    entity: int  # index into world.entities
    question: str
    answer: str
    with_image: bool


def fact_examples(world: PlantedWorld, entities: list[Entity], text_only: bool) -> list[Example]:
    """Every relation x every paraphrase, plus "visited" for each region, per entity.

    With ``text_only`` each question is also asked with the entity's name in
    place of the visual phrase and no image (the language-model-only view).
    """
    examples = []
    for entity in entities:
        pairs = [
            (template, entity.facts[relation])
            for relation, (_, templates) in RELATIONS.items()
            for template in templates
        ]
        for region in world.regions_of(entity.visited):
            first_city = next(c for c in entity.visited if world.city_region[c] == region)
            pairs.append((VISITED_TEMPLATE.replace("{region_phrase}", region_phrase(region)), first_city))
        for template, answer in pairs:
            examples.append(Example(entity.index, question_for(template, VISUAL_PHRASE), answer, True))
            if text_only:
                examples.append(Example(entity.index, question_for(template, entity.name), answer, False))
    return examples


def naming_examples(entities: list[Entity]) -> list[Example]:
    question = question_for(NAME_TEMPLATE, VISUAL_PHRASE)
    return [Example(e.index, question, e.name, True) for e in entities]


class BatchMaker:
    """Turns examples into model inputs exactly as the saved LlavaProcessor would.

    Token ids are cached per (question, answer); pixel values are normalised
    like the saved image processor (checked against it in the tests).
    """

    def __init__(self, world: PlantedWorld, tokenizer, image_tokens: int):
        self.world = world
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self._ids: dict[tuple[str, str, bool], tuple[list[int], int]] = {}
        self._mean = np.array(IMAGE_MEAN, dtype=np.float32)
        self._std = np.array(IMAGE_STD, dtype=np.float32)

    def encode(self, example: Example) -> tuple[list[int], int]:
        """(prompt + answer + eos ids, number of prompt ids)."""
        key = (example.question, example.answer, example.with_image)
        if key not in self._ids:
            prompt, _ = fallback_prompt(example.question, with_image=example.with_image)
            prompt = prompt.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * self.image_tokens)
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            answer_ids = self.tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"]
            self._ids[key] = (prompt_ids + answer_ids + [self.tokenizer.eos_token_id], len(prompt_ids))
        return self._ids[key]

    def pixels(self, array: np.ndarray) -> torch.Tensor:
        scaled = (array.astype(np.float32) / 255.0 - self._mean) / self._std
        return torch.from_numpy(scaled).permute(2, 0, 1)

    def batch(self, examples: list[Example], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        encoded = [self.encode(e) for e in examples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        inputs = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        images = [self.pixels(self.world.render_array(self.world.entities[e.entity], rng)) for e in examples if e.with_image]
        if images:
            inputs["pixel_values"] = torch.stack(images)
        return inputs

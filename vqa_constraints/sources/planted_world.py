"""A synthetic world with known ground truth, generated from a seed.

Made-up creatures, each with a distinct picture (a 4x4 grid of colours, drawn
with a random shift and pixel noise so every view differs) and made-up facts.
The `planted` source turns it into records; the planted-knowledge model in the
zoo is trained on it, so the tracer and editor can be checked against facts
whose storage location is known.

Entity roles:
- "scaffold": facts the zoo model learns with all its weights (teaches it to
  read images and route relations); not part of the dataset.
- "known": facts the zoo model stores in one planted MLP layer; the
  single- and multi-constraint configs ask about them.
- "longtail": entities the model can name but whose facts it never saw; the
  encyclopedic config asks about them (the editing track's insertion edits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
GRID = 4
PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
        [245, 130, 48], [145, 30, 180], [250, 250, 250], [20, 20, 20],
    ],
    dtype=np.int16,
)
MAX_SHIFT = 3
NOISE_STD = 12.0

VISUAL_PHRASE = "the creature in this image"

CITIES = [
    "varnhold", "quillmere", "ostrava", "brindle", "kestrel", "moorgate", "talwick", "pellion",
    "zandor", "ferncliff", "umbria", "castor", "lowmarsh", "ridley", "sunmoor", "halcyon",
    "dunmere", "everfall", "grimsby", "northwold",
]
REGIONS = ["north", "south", "east", "west"]
COLOURS = [
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "grey", "teal", "violet", "amber", "crimson", "indigo", "silver", "gold", "olive", "maroon",
]
FOODS = [
    "apples", "bread", "cheese", "carrots", "honey", "fish", "rice", "beans", "plums", "nuts",
    "soup", "figs", "corn", "mushrooms", "berries", "eggs", "olives", "pears", "cabbage", "dates",
]

# relation -> (value pool, question templates). The first template is the
# canonical question; the rest are its paraphrases.
RELATIONS: dict[str, tuple[list[str], list[str]]] = {
    "home_city": (
        CITIES,
        [
            "What is the home city of {s}?",
            "Which city does {s} come from?",
            "In which city does {s} live?",
        ],
    ),
    "favourite_colour": (
        COLOURS,
        [
            "What is the favourite colour of {s}?",
            "Which colour does {s} like most?",
            "What colour does {s} love?",
        ],
    ),
    "favourite_food": (
        FOODS,
        [
            "What food does {s} eat?",
            "Which food is eaten by {s}?",
            "What is the favourite food of {s}?",
        ],
    ),
}
# Used to teach a model to recognise every creature; not a dataset relation.
NAME_TEMPLATE = "What is the name of {s}?"
# Multi-constraint: a textual constraint ("in the north") narrows the answers.
VISITED_TEMPLATE = "Which city {region_phrase} has {s} visited?"
VISITS_PER_ENTITY = 3

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Entity:
    index: int
    name: str
    role: str  # scaffold | known | longtail
    pattern: tuple[int, ...]  # GRID*GRID palette indices
    facts: dict = field(hash=False, compare=False)  # relation -> value
    visited: tuple[str, ...] = ()


class PlantedWorld:
    """The whole world, fully determined by ``seed`` and the role sizes."""

    def __init__(self, seed: int = 0, n_scaffold: int = 120, n_known: int = 120, n_longtail: int = 60):
        self.seed = seed
        self.role_sizes = {"scaffold": n_scaffold, "known": n_known, "longtail": n_longtail}
        self.city_region = {city: REGIONS[i % len(REGIONS)] for i, city in enumerate(CITIES)}

    @cached_property
    def entities(self) -> list[Entity]:
        rng = random.Random(self.seed)
        total = sum(self.role_sizes.values())
        names = _unique_names(rng, total, forbidden=set(self.vocabulary_without_names()))
        patterns: set[tuple[int, ...]] = set()
        while len(patterns) < total:
            patterns.add(tuple(rng.randrange(len(PALETTE)) for _ in range(GRID * GRID)))
        ordered_patterns = sorted(patterns)
        rng.shuffle(ordered_patterns)
        roles = [role for role, size in self.role_sizes.items() for _ in range(size)]
        entities = []
        for index, (name, pattern, role) in enumerate(zip(names, ordered_patterns, roles)):
            facts = {relation: rng.choice(pool) for relation, (pool, _) in RELATIONS.items()}
            visited = tuple(rng.sample(CITIES, VISITS_PER_ENTITY))
            entities.append(Entity(index, name, role, pattern, facts, visited))
        return entities

    def by_role(self, role: str) -> list[Entity]:
        return [e for e in self.entities if e.role == role]

    # --- pictures -------------------------------------------------------
    def render_array(self, entity: Entity, rng: np.random.Generator) -> np.ndarray:
        """One view: the entity's colour grid, shifted by up to 3 px, with pixel noise."""
        cell = IMAGE_SIZE // GRID
        grid = PALETTE[np.array(entity.pattern).reshape(GRID, GRID)]
        image = np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1).astype(np.float32)
        dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
        image = np.roll(image, shift=(int(dy), int(dx)), axis=(0, 1))
        image += rng.normal(0.0, NOISE_STD, size=image.shape)
        return np.clip(image, 0, 255).astype(np.uint8)

    def view(self, entity: Entity, view: int) -> Image.Image:
        """A deterministic view; views 0-9 are reserved for the dataset, training uses others."""
        rng = np.random.default_rng([self.seed, entity.index, view])
        return Image.fromarray(self.render_array(entity, rng), mode="RGB")

    # --- questions ------------------------------------------------------
    def regions_of(self, cities) -> list[str]:
        return sorted({self.city_region[c] for c in cities}, key=REGIONS.index)

    def visited_question(self, entity: Entity) -> tuple[str, str, list[str]]:
        """(question, region, answers) for the multi-constraint question about ``entity``."""
        regions = self.regions_of(entity.visited)
        region = regions[entity.index % len(regions)]
        answers = [c for c in entity.visited if self.city_region[c] == region]
        question = VISITED_TEMPLATE.format(region_phrase=region_phrase(region), s=VISUAL_PHRASE)
        return _capitalise(question), region, answers

    def vocabulary_without_names(self) -> list[str]:
        words = set(CITIES) | set(REGIONS) | set(COLOURS) | set(FOODS)
        templates = [t for _, ts in RELATIONS.values() for t in ts] + [NAME_TEMPLATE, VISITED_TEMPLATE]
        for template in templates:
            text = template.replace("{s}", VISUAL_PHRASE).replace("{region_phrase}", "in the")
            words.update(_words(text))
        return sorted(words)

    def vocabulary(self) -> list[str]:
        """Every lower-cased word (and '?') any planted question or answer uses."""
        return sorted(set(self.vocabulary_without_names()) | {e.name for e in self.entities})


def region_phrase(region: str) -> str:
    return f"in the {region}"


def question_for(template: str, subject_phrase: str) -> str:
    return _capitalise(template.format(s=subject_phrase))


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _words(text: str) -> list[str]:
    return text.lower().replace("?", " ? ").split()


def _unique_names(rng: random.Random, count: int, forbidden: set[str]) -> list[str]:
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    names: list[str] = []
    seen = set(forbidden)
    while len(names) < count:
        name = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3))))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names

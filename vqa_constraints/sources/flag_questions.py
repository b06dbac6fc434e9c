"""The `flags` source: questions about the country whose flag is in the image.

single_constraint: well-known facts (capital, region, currency, ...) of every
country outside the long tail. encyclopedic: the long tail (the countries with
the smallest populations) asked about rarer facts (calling code, internet
domain, demonym, ...). multi_constraint: a visual constraint plus a textual
one, e.g. "Which country in Europe borders the country whose flag is in this
image?", answered with every country that satisfies both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vqa_constraints.records import TEXTUAL, VISUAL, Constraint, Record, stable_id
from vqa_constraints.sources.flags import LICENSE, Country, load_countries, region_by_name, subregion_by_name
from vqa_constraints.sources.splits import split_of

NAME = "flags"
VISUAL_PHRASE = "the country whose flag is in this image"
DEPICTED = "depicted_by_image"
LONG_TAIL_SIZE = 40
# A currency makes a textual constraint only when several countries share it
# (Euro, CFA franc, ...); a national currency would just name the country.
SHARED_CURRENCY_MIN = 3  # the countries with the smallest populations form the encyclopedic config


@dataclass(frozen=True)
class FlagRelation:
    name: str
    templates: tuple[str, ...]  # first is the question, the rest paraphrases; "{s}" is the country
    answers: Callable[[Country], list[str]]  # canonical first; empty when unknown
    multiple_valid: bool = False  # several entries are each a correct answer (any_of)


def _names(values) -> list[str]:
    return [v for v in dict.fromkeys(values) if v]


def _demonyms(country: Country) -> list[str]:
    return _names(part.strip() for part in country.demonym.split(","))


def _calling_codes(country: Country) -> list[str]:
    return _names(spelling for code in country.calling_codes for spelling in (f"+{code}", code))


SINGLE_RELATIONS = (
    FlagRelation(
        "capital",
        (
            "What is the capital of {s}?",
            "Which city is the capital of {s}?",
            "What is the capital city of {s}?",
        ),
        lambda c: [c.capital],
    ),
    FlagRelation(
        "region",
        (
            "In which region of the world is {s}?",
            "Which part of the world is {s} in?",
            "Where in the world is {s} located?",
        ),
        lambda c: [c.region],
    ),
    FlagRelation(
        "subregion",
        (
            "In which subregion of the world is {s}?",
            "Which subregion of the world does {s} belong to?",
        ),
        lambda c: [c.subregion],
    ),
    FlagRelation(
        "currency",
        (
            "What is the currency of {s}?",
            "Which currency is used in {s}?",
            "What money is used in {s}?",
        ),
        lambda c: list(c.currencies),
        multiple_valid=True,
    ),
    FlagRelation(
        "language",
        (
            "Which language is spoken in {s}?",
            "What language do people speak in {s}?",
            "Name a language spoken in {s}.",
        ),
        lambda c: list(c.languages),
        multiple_valid=True,
    ),
)

ENCYCLOPEDIC_RELATIONS = (
    SINGLE_RELATIONS[0],  # capital
    SINGLE_RELATIONS[3],  # currency
    SINGLE_RELATIONS[4],  # language
    FlagRelation(
        "calling_code",
        (
            "What is the international calling code of {s}?",
            "Which telephone country code belongs to {s}?",
        ),
        _calling_codes,
    ),
    FlagRelation(
        "top_level_domain",
        (
            "What is the internet country code top-level domain of {s}?",
            "Which internet domain ending belongs to {s}?",
        ),
        lambda c: list(c.top_level_domains),
    ),
    FlagRelation(
        "demonym",
        (
            "What are people from {s} called?",
            "What is the demonym of {s}?",
        ),
        _demonyms,
    ),
)

NEIGHBOUR_TEMPLATES = (
    "Which country {where} borders {s}?",
    "Which country {where} shares a border with {s}?",
    "Name a country {where} that borders {s}.",
)


def long_tail(countries: list[Country]) -> list[Country]:
    """The LONG_TAIL_SIZE least populous countries (ties broken by name)."""
    known = [c for c in countries if c.population]
    return sorted(known, key=lambda c: (c.population, c.name))[:LONG_TAIL_SIZE]


def records(countries: list[Country] | None = None) -> Iterator[Record]:
    countries = load_countries() if countries is None else countries
    tail = {c.name for c in long_tail(countries)}
    for country in countries:
        if country.name not in tail:
            for relation in SINGLE_RELATIONS:
                yield from _relation_record(country, relation, "single_constraint")
    regions = region_by_name()
    subregions = subregion_by_name()
    by_name = {c.name: c for c in countries}
    for country in countries:
        yield from _neighbour_records(country, regions, subregions, by_name)
    for country in countries:
        if country.name in tail:
            for relation in ENCYCLOPEDIC_RELATIONS:
                yield from _relation_record(country, relation, "encyclopedic")


def build_records(context) -> Iterator[Record]:
    return records()


def question_for(template: str, subject: str, **extra) -> str:
    text = template.format(s=subject, **extra)
    return text[:1].upper() + text[1:]


def text_name(country: Country) -> str:
    """How the country is named inside a sentence: 'the Netherlands', 'France'."""
    with_article = [a for a in country.aliases if a.lower() == f"the {country.name}".lower()]
    return f"the {country.name}" if with_article else country.name


def _common(country: Country, config: str, relation: str, question: str, text_question: str, **fields) -> Record:
    return Record(
        source=NAME,
        config=config,
        split=split_of(f"{NAME}:{country.name}"),
        image=country.flag,
        question=question,
        subject=country.name,
        relation=relation,
        text_only_question=text_question,
        license=LICENSE,
        **fields,
    )


def _visual(question: str, country: Country) -> Constraint:
    return Constraint.locate(question, VISUAL_PHRASE, VISUAL, country.name, DEPICTED)


def _relation_record(country: Country, relation: FlagRelation, config: str) -> Iterator[Record]:
    answers = _names(relation.answers(country))
    if not answers:
        return  # unanswerable from the facts: no row
    question = question_for(relation.templates[0], VISUAL_PHRASE)
    yield _common(
        country,
        config,
        relation.name,
        question,
        question_for(relation.templates[0], text_name(country)),
        id=stable_id(NAME, config, country.name, relation.name),
        answers=answers,
        answer_mode="any_of" if relation.multiple_valid and len(answers) > 1 else "aliases",
        constraints=[_visual(question, country)],
        paraphrases=[question_for(t, VISUAL_PHRASE) for t in relation.templates[1:]],
        meta=json.dumps({"iso3": country.iso3, "population": country.population}, sort_keys=True),
    )


def currency_users(countries) -> dict[str, int]:
    users: dict[str, int] = {}
    for country in countries:
        for currency in country.currencies:
            users[currency] = users.get(currency, 0) + 1
    return users


def region_phrase(region: str) -> str:
    return "in the Americas" if region == "Americas" else f"in {region}"


def _neighbour_records(country: Country, regions: dict[str, str], subregions: dict[str, str],
                       by_name: dict[str, Country]) -> Iterator[Record]:
    """Neighbours narrowed by a textual constraint; every neighbour that satisfies it is an answer.

    Constraints: the neighbour's region ("in Europe"), its subregion when that
    narrows the set ("in Western Europe"), or a currency it uses ("that uses
    the Euro") when that narrows the set.
    """
    if not country.borders or not country.borders_complete:
        return  # without the full set of neighbours an answer list could be incomplete
    borders = set(country.borders)
    groups: list[tuple[str, str, str, list[str]]] = []  # (phrase, entity, relation, answers)
    if all(name in regions for name in borders):
        for region in sorted({regions[n] for n in borders}):
            groups.append((region_phrase(region), region, "located_in", [n for n in country.borders if regions[n] == region]))
    if all(name in subregions for name in borders):
        for subregion in sorted({subregions[n] for n in borders}):
            answers = [n for n in country.borders if subregions[n] == subregion]
            if len(answers) < len(borders):
                groups.append((f"in {subregion}", subregion, "located_in", answers))
    if all(name in by_name for name in borders):
        shared = {cur for cur, users in currency_users(by_name.values()).items() if users >= SHARED_CURRENCY_MIN}
        for currency in sorted({cur for n in borders for cur in by_name[n].currencies} & shared):
            answers = [n for n in country.borders if currency in by_name[n].currencies]
            if len(answers) < len(borders):
                groups.append((f"that uses the {currency}", currency, "uses_currency", answers))
    for where, entity, constraint_relation, answers in groups:
        question = question_for(NEIGHBOUR_TEMPLATES[0], VISUAL_PHRASE, where=where)
        textual = Constraint.locate(question, where, TEXTUAL, entity, constraint_relation)
        yield _common(
            country,
            "multi_constraint",
            "borders",
            question,
            question_for(NEIGHBOUR_TEMPLATES[0], text_name(country), where=where),
            id=stable_id(NAME, "multi_constraint", country.name, "borders", constraint_relation, entity),
            answers=answers,
            answer_mode="any_of",
            constraints=[_visual(question, country), textual],
            paraphrases=[question_for(t, VISUAL_PHRASE, where=where) for t in NEIGHBOUR_TEMPLATES[1:]],
            meta=json.dumps(
                {"iso3": country.iso3, "population": country.population, "all_borders": list(country.borders)},
                sort_keys=True,
            ),
        )

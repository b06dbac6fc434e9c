"""The `mllminterpret-known` source: the paper authors' multimodal_known.csv joined with ROME's known_1000.json.

multimodal_known.csv (written by pandas, unnamed index column first):
    ,question,subject,main_entity,image_url
    0,This building is located in,Space Needle,This building,./A photo of Space Needle
`main_entity` is the visual constraint inside `question`. The CSV has no
answer: it comes from the known_1000.json record with the same `subject`
(answer = `attribute`). When a subject has several facts there, the one whose
`template`, filled with `main_entity`, equals the question is used.

Inputs: --source-path mllminterpret-known=CSV_OR_FOLDER
        [--source-path mllminterpret-known.known=known_1000.json]  (default: next to the CSV)
        [--source-path mllminterpret-known.images=DIR]             (default: the CSV's folder)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vqa_constraints.errors import UserError, where
from vqa_constraints.records import Record, stable_id
from vqa_constraints.sources.images import ImageProblem, load_image
from vqa_constraints.sources.splits import split_of
from vqa_constraints.sources.tabular import (
    cell,
    companion_file,
    images_root,
    locate_visual,
    main_file,
    read_csv,
    read_json,
    text_only,
)

NAME = "mllminterpret-known"
CSV_NAME = "multimodal_known.csv"
COLUMNS = ("question", "subject", "main_entity", "image_url")
KNOWN_FIELDS = ("subject", "attribute")
LICENSE = "MIT (MLLMInterpret constraints; ROME known_1000 facts); images: their owners' terms"


def load_known_facts(path: Path) -> dict[str, list[dict]]:
    """subject -> known_1000 records."""
    data = read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of known_1000 records")
    by_subject: dict[str, list[dict]] = {}
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(f"{where(path, index)}: expected an object")
        missing = [f for f in KNOWN_FIELDS if f not in record]
        if missing:
            raise UserError(f"{where(path, index, missing[0])}: missing")
        by_subject.setdefault(str(record["subject"]).strip(), []).append(record)
    return by_subject


def pick_fact(facts: list[dict], question: str, main_entity: str) -> dict | None:
    """The one fact a question asks about, or None when it is ambiguous."""
    if len({str(f["attribute"]).strip() for f in facts}) == 1:
        return facts[0]
    # main_entity carries the punctuation around it ("this place,", "This text's"); the template has its own.
    fillers = {main_entity, main_entity.rstrip(",:"), main_entity.removesuffix("'s")}
    matching = [
        f for f in facts
        if "template" in f and any(str(f["template"]).replace("{}", x).lower() == question.lower() for x in fillers)
    ]
    return matching[0] if len(matching) == 1 else None


def build_records(context) -> Iterator[Record]:
    csv_path = main_file(context, CSV_NAME)
    known_path = companion_file(context, "known", ("known_1000.json",), csv_path)
    root = images_root(context, csv_path)
    facts = load_known_facts(known_path)
    for number, row in read_csv(csv_path, COLUMNS):
        location = where(csv_path, number)
        question, subject = cell(row, "question"), cell(row, "subject")
        main_entity, image_url = cell(row, "main_entity"), cell(row, "image_url")
        empty = next((c for c, v in (("question", question), ("subject", subject), ("main_entity", main_entity)) if not v), None)
        if empty:
            context.reject(f"{location} field {empty!r}", "is empty")
            continue
        try:
            constraint = locate_visual(question, main_entity, subject)
        except ValueError as error:
            context.reject(f"{location} field 'main_entity'", str(error))
            continue
        candidates = facts.get(subject)
        if not candidates:
            context.reject(f"{location} field 'subject'", f"{subject!r} has no record in {known_path.name}")
            continue
        fact = pick_fact(candidates, question, main_entity)
        if fact is None:
            context.reject(
                f"{location} field 'subject'",
                f"{subject!r} has {len(candidates)} facts in {known_path.name} and none matches the question",
            )
            continue
        answer = str(fact["attribute"]).strip()
        if not answer:
            context.reject(f"{location} field 'answers'", f"empty attribute in {known_path.name} for {subject!r}")
            continue
        try:
            image = load_image(root, image_url)
        except ImageProblem as error:
            context.reject(f"{location} field 'image_url'", str(error))
            continue
        yield Record(
            id=stable_id(NAME, "single_constraint", question, subject, image_url),
            source=NAME,
            config="single_constraint",
            split=split_of(f"{NAME}:{subject}"),
            image=image,
            question=question,
            answers=[answer],
            constraints=[constraint],
            subject=subject,
            relation=str(fact.get("relation_id") or "unknown"),
            text_only_question=text_only(question, constraint, subject),
            license=LICENSE,
            meta=json.dumps(
                {"csv_row": number, "known_id": fact.get("known_id"), "image_url": image_url,
                 "rome_prompt": fact.get("prompt")},
                sort_keys=True,
            ),
        )

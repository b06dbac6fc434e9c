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

from collections.abc import Iterator
from pathlib import Path

from vqa_constraints.errors import UserError, where
from vqa_constraints.records import Record
from vqa_constraints.sources.mllminterpret_csv import constrained_rows, row_record
from vqa_constraints.sources.tabular import companion_file, images_root, main_file, read_json

NAME = "mllminterpret-known"
CSV_NAME = "multimodal_known.csv"
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
    for row in constrained_rows(context, csv_path, "subject", ("question", "subject", "main_entity")):
        candidates = facts.get(row.subject)
        if not candidates:
            context.reject(f"{row.location} field 'subject'", f"{row.subject!r} has no record in {known_path.name}")
            continue
        fact = pick_fact(candidates, row.question, row.main_entity)
        if fact is None:
            context.reject(
                f"{row.location} field 'subject'",
                f"{row.subject!r} has {len(candidates)} facts in {known_path.name} and none matches the question",
            )
            continue
        answer = str(fact["attribute"]).strip()
        if not answer:
            context.reject(f"{row.location} field 'answers'", f"empty attribute in {known_path.name} for {row.subject!r}")
            continue
        yield from row_record(
            context, root, NAME, LICENSE, row,
            answers=[answer],
            relation=str(fact.get("relation_id") or "unknown"),
            meta={"known_id": fact.get("known_id"), "rome_prompt": fact.get("prompt")},
        )

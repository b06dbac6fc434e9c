"""The row loop the two MLLMInterpret CSV sources share.

Both CSVs have the columns question, SUBJECT, main_entity, image_url, where
SUBJECT names the pictured entity (``subject`` in multimodal_known.csv,
``director`` in multimodal_movies.csv). A source takes the rows from
``constrained_rows``, looks up its answers, then gets the record from
``row_record``, which loads the image last: a row with several problems is
rejected for its empty field, then its constraint, then its answers, then its image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vqa_constraints.errors import where
from vqa_constraints.records import Constraint, Record, stable_id
from vqa_constraints.sources.images import ImageProblem, load_image
from vqa_constraints.sources.splits import split_of
from vqa_constraints.sources.tabular import cell, locate_visual, read_csv, text_only

CONFIG = "single_constraint"


@dataclass(frozen=True)
class ConstrainedRow:
    """A CSV row whose required fields are filled and whose main_entity occurs in its question."""

    number: int
    location: str
    question: str
    subject: str
    main_entity: str
    image_url: str
    constraint: Constraint


def constrained_rows(
    context, csv_path: Path, subject_column: str, required: tuple[str, ...]
) -> Iterator[ConstrainedRow]:
    """The rows of ``csv_path`` that pass the shared checks; the others are rejected through ``context``.

    ``required``: the columns that may not be empty, reported in this order.
    """
    columns = ("question", subject_column, "main_entity", "image_url")
    for number, row in read_csv(csv_path, columns):
        location = where(csv_path, number)
        fields = {column: cell(row, column) for column in columns}
        empty = next((column for column in required if not fields[column]), None)
        if empty:
            context.reject(f"{location} field {empty!r}", "is empty")
            continue
        question, subject, main_entity = fields["question"], fields[subject_column], fields["main_entity"]
        try:
            constraint = locate_visual(question, main_entity, subject)
        except ValueError as error:
            context.reject(f"{location} field 'main_entity'", str(error))
            continue
        yield ConstrainedRow(number, location, question, subject, main_entity, fields["image_url"], constraint)


def row_record(
    context, root: Path, source: str, license: str, row: ConstrainedRow,
    answers: list[str], relation: str, meta: dict, **record_fields,
) -> Iterator[Record]:
    """The row's record, or nothing when its image cannot be loaded (rejected through ``context``).

    ``meta`` goes into the record's meta next to the CSV row number and image
    URL; ``record_fields`` are further Record fields (e.g. ``answer_mode``).
    """
    try:
        image = load_image(root, row.image_url)
    except ImageProblem as error:
        context.reject(f"{row.location} field 'image_url'", str(error))
        return
    yield Record(
        id=stable_id(source, CONFIG, row.question, row.subject, row.image_url),
        source=source,
        config=CONFIG,
        split=split_of(f"{source}:{row.subject}"),
        image=image,
        question=row.question,
        answers=answers,
        constraints=[row.constraint],
        subject=row.subject,
        relation=relation,
        text_only_question=text_only(row.question, row.constraint, row.subject),
        license=license,
        meta=json.dumps({"csv_row": row.number, "image_url": row.image_url, **meta}, sort_keys=True),
        **record_fields,
    )

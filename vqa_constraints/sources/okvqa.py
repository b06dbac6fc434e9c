"""The `okvqa` source: OK-VQA questions with answers from the official annotations.

Two ways in:
1. The paper's okvqa.csv (pandas index column first):
       ,question,main_entity,image_url
       0,What sport can you use this for?,this,./val2014/COCO_val2014_000000297147.jpg
   joined to the official question file on (COCO image id, question text) to
   get the question id, then to the annotation file for answers.
   `main_entity` is the visual constraint.
2. The official question JSON alone (OpenEnded_mscoco_val2014_questions.json):
   the visual constraint is the question's first demonstrative phrase
   ("this animal"); questions without one are rejected.

Answers: the ten annotators' answers, most frequent first. Answers that only
one annotator gave are kept only when no answer was given twice (OK-VQA's
own accuracy gives a single vote 1/3 credit). Vote counts go to `meta`.

Inputs: --source-path okvqa=okvqa.csv | OpenEnded_mscoco_val2014_questions.json
        [--source-path okvqa.questions=OpenEnded_mscoco_val2014_questions.json]  (CSV mode; default: next to it)
        [--source-path okvqa.annotations=mscoco_val2014_annotations.json]       (default: next to the main file)
        [--source-path okvqa.images=DIR]  (COCO images; default: the main file's folder)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vqa_constraints.errors import UserError, where
from vqa_constraints.records import Record, stable_id
from vqa_constraints.sources.images import ImageProblem, load_image
from vqa_constraints.sources.splits import split_of
from vqa_constraints.sources.tabular import (
    cell,
    companion_file,
    demonstrative_phrase,
    images_root,
    locate_visual,
    main_file,
    read_csv,
    read_json,
)

NAME = "okvqa"
CSV_NAME = "okvqa.csv"
CSV_COLUMNS = ("question", "main_entity", "image_url")
QUESTION_FILES = ("OpenEnded_mscoco_val2014_questions.json", "OpenEnded_mscoco_train2014_questions.json")
ANNOTATION_FILES = ("mscoco_val2014_annotations.json", "mscoco_train2014_annotations.json")
LICENSE = "OK-VQA annotations: CC BY 4.0; COCO images: their Flickr licences"
_COCO_ID = re.compile(r"(\d{6,})\D*$")


def _list_field(path: Path, key: str) -> list:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UserError(f"{path}: missing field {key!r} (not an OK-VQA {key} file)")
    return data[key]


def load_questions(path: Path) -> tuple[list[dict], str]:
    """The official question records and the COCO subtype ("val2014") they refer to."""
    questions = _list_field(path, "questions")
    for index, question in enumerate(questions):
        for field in ("image_id", "question", "question_id"):
            if not isinstance(question, dict) or field not in question:
                raise UserError(f"{where(path, index, field)}: missing")
    subtype = str(read_json(path).get("data_subtype") or "val2014")
    return questions, subtype


def load_answers(path: Path) -> dict[int, list[str]]:
    """question_id -> the annotators' answers (one entry per annotator)."""
    answers = {}
    for index, annotation in enumerate(_list_field(path, "annotations")):
        if not isinstance(annotation, dict) or "question_id" not in annotation or "answers" not in annotation:
            raise UserError(f"{where(path, index, 'answers')}: missing question_id or answers")
        answers[int(annotation["question_id"])] = [
            str(a.get("answer", "")).strip() for a in annotation["answers"] if isinstance(a, dict)
        ]
    return answers


def accepted_answers(votes: list[str]) -> tuple[list[str], dict[str, int]]:
    counts = Counter(v for v in votes if v)
    ranked = sorted(counts, key=lambda a: (-counts[a], votes.index(a)))
    agreed = [a for a in ranked if counts[a] >= 2]
    return (agreed or ranked), {a: counts[a] for a in ranked}


def coco_image_name(image_id: int, subtype: str) -> str:
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def build_records(context) -> Iterator[Record]:
    main = main_file(context, CSV_NAME)
    annotations = load_answers(companion_file(context, "annotations", ANNOTATION_FILES, main))
    root = images_root(context, main)
    if main.suffix.lower() == ".json":
        yield from _from_official(context, main, annotations, root)
    else:
        yield from _from_paper_csv(context, main, annotations, root)


def _from_paper_csv(context, csv_path: Path, annotations, root: Path) -> Iterator[Record]:
    questions, _ = load_questions(companion_file(context, "questions", QUESTION_FILES, csv_path))
    question_ids = {(int(q["image_id"]), str(q["question"]).strip()): int(q["question_id"]) for q in questions}
    for number, row in read_csv(csv_path, CSV_COLUMNS):
        location = where(csv_path, number)
        question, main_entity, image_url = cell(row, "question"), cell(row, "main_entity"), cell(row, "image_url")
        if not question:
            context.reject(f"{location} field 'question'", "is empty")
            continue
        match = _COCO_ID.search(Path(image_url).stem)
        if not match:
            context.reject(f"{location} field 'image_url'", f"{image_url!r} is not a COCO image file name")
            continue
        question_id = question_ids.get((int(match.group(1)), question))
        if question_id is None:
            context.reject(f"{location} field 'question'", "not found in the OK-VQA question file for this image")
            continue
        yield from _record(context, location, question, main_entity, question_id, annotations, root, image_url)


def _from_official(context, questions_path: Path, annotations, root: Path) -> Iterator[Record]:
    questions, subtype = load_questions(questions_path)
    for index, entry in enumerate(questions):
        location = where(questions_path, index)
        question = str(entry["question"]).strip()
        phrase = demonstrative_phrase(question)
        if phrase is None:
            context.reject(f"{location} field 'question'", "no visual constraint (no this/these/that/those phrase)")
            continue
        name = coco_image_name(entry["image_id"], subtype)
        image_url = f"{subtype}/{name}" if (root / subtype / name).is_file() else name
        yield from _record(context, location, question, phrase, int(entry["question_id"]), annotations, root, image_url)


def _record(context, location, question, phrase, question_id, annotations, root, image_url) -> Iterator[Record]:
    try:
        constraint = locate_visual(question, phrase, phrase)
    except ValueError as error:
        context.reject(f"{location} field 'main_entity'", str(error))
        return
    votes = annotations.get(question_id)
    answers, counts = accepted_answers(votes or [])
    if not answers:
        context.reject(f"{location} field 'answers'", f"question {question_id} has no annotated answer")
        return
    try:
        image = load_image(root, image_url)
    except ImageProblem as error:
        context.reject(f"{location} field 'image_url'", str(error))
        return
    yield Record(
        id=stable_id(NAME, "single_constraint", str(question_id), question),
        source=NAME,
        config="single_constraint",
        split=split_of(f"{NAME}:{image_url}"),
        image=image,
        question=question,
        answers=answers,
        constraints=[constraint],
        # OK-VQA names no entity: the subject is the phrase itself and the
        # text-only question cannot name it, so it stays the question.
        subject=constraint.text,
        relation="okvqa",
        text_only_question=question,
        license=LICENSE,
        meta=json.dumps({"question_id": question_id, "answer_votes": counts, "image_url": image_url}, sort_keys=True),
    )

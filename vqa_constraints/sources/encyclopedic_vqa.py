"""The `encyclopedic-vqa` source: the official Encyclopedic-VQA CSV (train/val/test.csv).

Columns used: question, answer, dataset_image_ids, dataset_name,
question_type, wikipedia_title (and, when present, question_original,
encyclopedic_vqa_split, wikipedia_url). `answer` separates annotators'
answers with '|' (aliases) and, for multi_answer questions, required answers
with '&&' (every one valid: any_of). `dataset_image_ids` lists up to five
images separated by '|': the first is the record's image, the others that are
found become `other_views`.

The visual constraint is the question's first demonstrative phrase ("this
hotel"); `question_original` of "automatic" questions names the subject and
becomes `text_only_question`.

Images are looked up under the images root as <dataset_name>/<id>, <id>, or
the Google-Landmarks-v2 layout <a>/<b>/<c>/<id>, each with common extensions.

Inputs: --source-path encyclopedic-vqa=test.csv
        [--source-path encyclopedic-vqa.images=DIR]  (default: the CSV's folder)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vqa_constraints.errors import where
from vqa_constraints.records import Record, stable_id
from vqa_constraints.sources.images import ImageProblem, find_image, open_image
from vqa_constraints.sources.splits import split_of
from vqa_constraints.sources.tabular import (
    cell,
    demonstrative_phrase,
    images_root,
    locate_visual,
    main_file,
    read_csv,
    text_only,
)

NAME = "encyclopedic-vqa"
CSV_NAME = "test.csv"
COLUMNS = ("question", "answer", "dataset_image_ids", "dataset_name", "question_type", "wikipedia_title")
LICENSE = "Encyclopedic-VQA: CC BY 4.0; images: iNaturalist 2021 / Google Landmarks v2 licences"


def parse_answers(answer: str, question_type: str) -> tuple[list[str], str]:
    if question_type == "multi_answer":
        parts = [a.strip() for alternative in answer.split("|") for a in alternative.split("&&")]
        return list(dict.fromkeys(p for p in parts if p)), "any_of"
    return list(dict.fromkeys(a.strip() for a in answer.split("|") if a.strip())), "aliases"


def image_candidates(dataset_name: str, image_id: str) -> list[str]:
    nested = "/".join(image_id[:3]) + f"/{image_id}" if len(image_id) >= 3 else image_id
    return [f"{dataset_name}/{image_id}", image_id, f"{dataset_name}/{nested}", nested]


def find_dataset_image(root: Path, dataset_name: str, image_id: str) -> Path:
    for reference in image_candidates(dataset_name, image_id):
        try:
            return find_image(root, reference)
        except ImageProblem:
            continue
    raise ImageProblem(f"image {image_id!r} of {dataset_name!r} not found under {root}")


def build_records(context) -> Iterator[Record]:
    csv_path = main_file(context, CSV_NAME)
    root = images_root(context, csv_path)
    for number, row in read_csv(csv_path, COLUMNS):
        location = where(csv_path, number)
        question, question_type = cell(row, "question"), cell(row, "question_type")
        subject = cell(row, "wikipedia_title").split("|")[0].strip()
        if not question or not subject:
            context.reject(f"{location} field {'question' if not question else 'wikipedia_title'!r}", "is empty")
            continue
        answers, mode = parse_answers(cell(row, "answer"), question_type)
        if not answers:
            context.reject(f"{location} field 'answer'", "is empty")
            continue
        phrase = demonstrative_phrase(question)
        if phrase is None:
            context.reject(f"{location} field 'question'", "no visual constraint (no this/these/that/those phrase)")
            continue
        constraint = locate_visual(question, phrase, subject)
        image_ids = [i.strip() for i in cell(row, "dataset_image_ids").split("|") if i.strip()]
        if not image_ids:
            context.reject(f"{location} field 'dataset_image_ids'", "is empty")
            continue
        dataset_name = cell(row, "dataset_name")
        try:
            image = open_image(find_dataset_image(root, dataset_name, image_ids[0]))
            views = []
            for image_id in image_ids[1:]:
                try:
                    views.append(open_image(find_dataset_image(root, dataset_name, image_id)))
                except ImageProblem:
                    continue  # extra views are optional; the first image is required
        except ImageProblem as error:
            context.reject(f"{location} field 'dataset_image_ids'", str(error))
            continue
        original = cell(row, "question_original")
        text_question = (
            original if question_type == "automatic" and original and original != question
            else text_only(question, constraint, subject)
        )
        official_split = cell(row, "encyclopedic_vqa_split")
        yield Record(
            id=stable_id(NAME, "encyclopedic", question, subject, image_ids[0]),
            source=NAME,
            config="encyclopedic",
            split={"val": "validation", "test": "test"}.get(official_split) or split_of(f"{NAME}:{subject}"),
            image=image,
            question=question,
            answers=answers,
            answer_mode=mode,
            constraints=[constraint],
            subject=subject,
            relation=question_type or "unknown",
            text_only_question=text_question,
            other_views=views,
            license=LICENSE,
            meta=json.dumps(
                {"csv_row": number, "dataset_name": dataset_name, "dataset_image_ids": image_ids,
                 "wikipedia_url": cell(row, "wikipedia_url"), "question_type": question_type,
                 "encyclopedic_vqa_split": official_split},
                sort_keys=True,
            ),
        )

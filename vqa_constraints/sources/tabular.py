"""Helpers shared by the adapters for user-supplied files: reading tables and JSON with
clear errors, and finding the visual constraint inside a question."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from vqa_constraints.errors import UserError
from vqa_constraints.records import VISUAL, Constraint

DEMONSTRATIVES = ("this", "these", "that", "those")
# Words that end a demonstrative noun phrase ("this hotel is ..." -> "this hotel").
_PHRASE_STOP = {
    "is", "are", "was", "were", "be", "been", "do", "does", "did", "has", "have", "had", "can", "could",
    "will", "would", "should", "may", "might", "must", "in", "on", "at", "of", "for", "to", "from", "with",
    "by", "and", "or", "but", "as", "a", "an", "the", "it", "its", "called", "used", "made", "known",
    # frequent verbs right after a bare demonstrative ("what does this grow from?")
    "grow", "get", "look", "looks", "mean", "means", "use", "make", "go", "come", "live", "eat", "belong",
    "taste", "cost", "weigh", "need", "contain", "appear", "run", "work",
}
_CLASSIFIERS = {"type", "kind", "sort", "breed", "species", "style", "variety", "brand", "model"}


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(1-based data row number, row) for every row; a missing column is a UserError.

    The paper's CSVs were written by pandas with an unnamed index column first;
    it is ignored like any other extra column.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [column for column in required if column not in header]
            if missing:
                raise UserError(f"{path}: missing column {missing[0]!r} (has {', '.join(h for h in header if h)})")
            return [(number, row) for number, row in enumerate(reader, start=1)]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as error:
        raise UserError(f"{path}: malformed CSV: {error}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a CSV file") from None


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON: {str(error).splitlines()[0]}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a JSON file") from None


def cell(row: dict, column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def locate_visual(question: str, phrase: str, entity: str, relation: str = "depicted_by_image") -> Constraint:
    """The visual constraint ``phrase`` inside ``question``.

    Exact match first; otherwise a case-insensitive match, stored with the
    question's own spelling ("This place" found as "this place"). Raises
    ValueError when the phrase does not occur.
    """
    phrase = phrase.strip()
    if not phrase:
        raise ValueError("visual constraint text is empty")
    start = question.find(phrase)
    if start < 0:
        start = question.lower().find(phrase.lower())
    if start < 0:
        raise ValueError(f"constraint text {phrase!r} does not occur in the question")
    text = question[start : start + len(phrase)]
    return Constraint(text, VISUAL, start, start + len(text), entity, relation)


def demonstrative_phrase(question: str) -> str | None:
    """The first demonstrative noun phrase ("this hotel", "these animals"), or None.

    A heuristic for sources that do not annotate the visual constraint: the
    demonstrative plus the noun after it (and "of X" after type/kind/breed...),
    stopping at verbs, prepositions and punctuation.
    """
    for match in re.finditer(r"\b(this|these|that|those)\b", question, flags=re.IGNORECASE):
        words = [match.group(0)]
        following = re.match(r"(?:\s+[A-Za-z][A-Za-z'-]*){0,3}", question[match.end():]).group(0).split()
        if following and following[0].lower() not in _PHRASE_STOP:
            words.append(following[0])
            # "this type of blanket": a classifier noun takes its "of" complement.
            if following[0].lower() in _CLASSIFIERS and following[1:2] == ["of"] and len(following) > 2:
                words += following[1:3]
        phrase = " ".join(words)
        return phrase if phrase in question else match.group(0)
    return None


def text_only(question: str, constraint: Constraint, subject: str) -> str:
    """The question with the visual constraint replaced by the subject's name.

    Trailing punctuation or a possessive on the phrase ("This text's",
    "This software,") is kept after the name.
    """
    text = constraint.text
    suffix = ""
    for ending in ("'s", ",", ":"):
        if text.endswith(ending):
            suffix = ending
            break
    replaced = question[: constraint.char_start] + subject + suffix + question[constraint.char_end :]
    return replaced[:1].upper() + replaced[1:] if constraint.char_start == 0 else replaced


def main_file(context, default_name: str) -> Path:
    """The source's main file: ``--source-path NAME=FILE``, or ``default_name`` inside a folder."""
    path = context.path()
    if path.is_dir():
        path = path / default_name
        if not path.is_file():
            raise UserError(f"--source-path {context.name}={context.path()}: folder has no {default_name}")
    return path


def companion_file(context, key: str, default_names: tuple[str, ...], main: Path) -> Path:
    """A second input: ``--source-path NAME.KEY=PATH``, else a default name next to the main file."""
    explicit = context.optional_path(key)
    if explicit is not None:
        return explicit
    for name in default_names:
        if (main.parent / name).is_file():
            return main.parent / name
    raise UserError(
        f"source {context.name!r} needs {default_names[0]} next to {main} or --source-path {context.name}.{key}=PATH"
    )


def images_root(context, main: Path) -> Path:
    """``--source-path NAME.images=DIR``, else ``images/`` next to the main file, else its folder."""
    root = context.optional_path("images")
    if root is None:
        return main.parent / "images" if (main.parent / "images").is_dir() else main.parent
    if not root.is_dir():
        raise UserError(f"--source-path {context.name}.images={root}: not a folder")
    return root

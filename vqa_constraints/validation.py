"""Checks for records and for built folders.

Each row is checked against the JSON Schema shipped in
``schema/record.schema.json`` and against rules the schema cannot express
(spans match the question text, counts agree, the image decodes and hashes to
``image_id``). A folder is also checked as a whole: ids unique across configs,
and the card's YAML lists exactly the parquet shards that are present.
The builder runs the same row checks before writing, so a build never holds
a row that ``validate`` would reject.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import yaml
from PIL import Image

from vqa_constraints.files import load_schema
from vqa_constraints.records import CONSTRAINT_TYPES, VISUAL, sha256_hex

IMAGE_FIELDS = ("image",)
IMAGE_LIST_FIELDS = ("other_views",)


@dataclass(frozen=True)
class Violation:
    location: str  # file (and row) where it was found
    record_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        record = f" id={self.record_id}" if self.record_id else ""
        return f"{self.location}{record} field {self.field!r}: {self.message}"


@lru_cache(maxsize=1)
def schema() -> dict:
    return load_schema("vqa_constraints", "schema", "record.schema.json")


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


def schema_view(row: dict) -> dict:
    """The row as JSON Schema sees it: each image replaced by its byte count and path."""
    view = dict(row)
    for name in IMAGE_FIELDS:
        view[name] = _image_view(row.get(name))
    for name in IMAGE_LIST_FIELDS:
        value = row.get(name)
        view[name] = [_image_view(v) for v in value] if isinstance(value, list) else value
    return view


def _image_view(value):
    if isinstance(value, dict) and "bytes" in value:
        data = value.get("bytes")
        return {"num_bytes": len(data) if isinstance(data, (bytes, bytearray)) else 0, "path": value.get("path")}
    return value


def row_problems(row: dict) -> list[tuple[str, str]]:
    """(field, message) for everything wrong with one stored row; empty when valid."""
    problems = []
    for error in sorted(_validator().iter_errors(schema_view(row)), key=lambda e: list(e.absolute_path)):
        field = ".".join(str(p) for p in error.absolute_path) or _missing_property(error) or "record"
        message = _schema_message(error)
        if field.endswith(".num_bytes"):  # our stand-in for the image bytes: report the image itself
            field, message = field.removesuffix(".num_bytes"), "has no bytes"
        problems.append((field, message))
    if problems:
        return problems  # the rule checks below assume the shapes the schema guarantees
    question = row["question"]
    for index, constraint in enumerate(row["constraints"]):
        start, end = constraint["char_start"], constraint["char_end"]
        where = f"constraints.{index}"
        if not 0 <= start < end <= len(question):
            problems.append((where, f"span [{start}, {end}) lies outside the question ({len(question)} chars)"))
        elif question[start:end] != constraint["text"]:
            problems.append(
                (where, f"text {constraint['text']!r} != question[{start}:{end}] {question[start:end]!r}")
            )
    types = {c["type"] for c in row["constraints"]}
    if VISUAL not in types:
        problems.append(("constraints", "no visual constraint (the phrase that refers to the image)"))
    expected_types = "+".join(sorted(types, key=CONSTRAINT_TYPES.index))
    if row["constraint_types"] != expected_types:
        problems.append(("constraint_types", f"is {row['constraint_types']!r} but constraints give {expected_types!r}"))
    if row["num_constraints"] != len(row["constraints"]):
        problems.append(("num_constraints", f"is {row['num_constraints']} but there are {len(row['constraints'])}"))
    if len(set(row["answers"])) != len(row["answers"]):
        problems.append(("answers", "lists the same answer twice"))
    try:
        json.loads(row["meta"])
    except ValueError:
        problems.append(("meta", "is not valid JSON"))
    image_data = row["image"]["bytes"]
    if not _decodes(image_data):
        problems.append(("image", "does not decode as an image"))
    elif sha256_hex(image_data) != row["image_id"]:
        problems.append(("image_id", "is not the sha256 of the image bytes"))
    for index, view in enumerate(row["other_views"]):
        if not _decodes(view["bytes"]):
            problems.append((f"other_views.{index}", "does not decode as an image"))
    return problems


def _missing_property(error: jsonschema.ValidationError) -> str | None:
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        return missing[0] if missing else None
    return None


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        return error.message
    if error.validator == "minItems" and error.validator_value == 1:
        return "is empty"
    if error.validator in ("minLength", "pattern") and isinstance(error.instance, str) and not error.instance.strip():
        return "is empty"
    return error.message if len(error.message) < 160 else error.message[:157] + "..."


def _decodes(data) -> bool:
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # any decoder failure means the same thing to the user
        return False


# --- whole folders ----------------------------------------------------------

def read_card_configs(folder: Path) -> list[dict]:
    """The `configs:` list from the YAML front matter of ``folder/README.md``."""
    card = folder / "README.md"
    if not card.exists():
        raise FileNotFoundError(f"{card}: missing (a build needs a dataset card with YAML `configs:`)")
    text = card.read_text("utf-8")
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        raise ValueError(f"{card}: no YAML front matter")
    front = yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}
    return front.get("configs") or []


def card_shards(configs: list[dict]) -> dict[str, str]:
    """shard path (relative, posix) -> 'config/split' as the card lists them."""
    listed = {}
    for config in configs:
        for entry in config.get("data_files") or []:
            paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            for path in paths:
                listed[path] = f"{config['config_name']}/{entry['split']}"
    return listed


def validate_folder(folder: str | Path) -> list[Violation]:
    """Every violation in a built folder; an empty list means it is clean."""
    folder = Path(folder)
    card = folder / "README.md"
    try:
        configs = read_card_configs(folder)
    except (OSError, ValueError, yaml.YAMLError) as error:
        return [Violation(str(card), None, "configs", str(error).splitlines()[0])]
    violations: list[Violation] = []
    if not configs:
        violations.append(Violation(str(card), None, "configs", "lists no configs"))
    defaults = [c.get("config_name") for c in configs if c.get("default")]
    if len(defaults) != 1:
        violations.append(Violation(str(card), None, "configs", f"needs exactly one default config, has {len(defaults)}"))
    listed = card_shards(configs)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")}
    for path in sorted(set(listed) - present):
        violations.append(Violation(str(card), None, "configs", f"lists {path} which is not present"))
    for path in sorted(present - set(listed)):
        violations.append(Violation(str(card), None, "configs", f"does not list shard {path}"))

    seen: dict[str, str] = {}
    for path in sorted(present & set(listed)):
        config, split = listed[path].split("/")
        violations.extend(_validate_shard(folder / path, config, split, seen))
    return violations


def _validate_shard(path: Path, config: str, split: str, seen: dict[str, str]) -> list[Violation]:
    violations = []
    try:
        table = pq.read_table(path)
    except Exception as error:  # a corrupt file is a finding, not a crash
        return [Violation(str(path), None, "file", f"unreadable parquet: {str(error).splitlines()[0]}")]
    features = json.loads((table.schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
    image_feature = features.get("info", {}).get("features", {}).get("image", {})
    if image_feature.get("_type") != "Image":
        violations.append(Violation(str(path), None, "image", "parquet metadata does not declare the datasets Image feature"))
    for index, row in enumerate(table.to_pylist()):
        record_id = row.get("id") if isinstance(row.get("id"), str) else None
        location = f"{path} row {index}"
        for field, message in row_problems(row):
            violations.append(Violation(location, record_id, field, message))
        if row.get("config") != config or row.get("split") != split:
            violations.append(
                Violation(location, record_id, "config", f"row says {row.get('config')}/{row.get('split')} but sits in {config}/{split}")
            )
        if record_id is not None:
            if record_id in seen:
                violations.append(Violation(location, record_id, "id", f"duplicate of the row in {seen[record_id]}"))
            else:
                seen[record_id] = f"{path.parent.name}/{path.name} row {index}"
    return violations

"""The record: one factual visual question with its constraints.

Every source turns its raw inputs into ``Record`` objects; the builder turns
records into parquet rows with ``FEATURES``; the harness and the editor read
rows back with ``Record.from_row``. This module is the contract between them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import datasets
from PIL import Image

VISUAL = "visual"
TEXTUAL = "textual"
CONSTRAINT_TYPES = (VISUAL, TEXTUAL)

# How ``answers`` is read: "aliases" means answers[0] is canonical and the
# rest are accepted spellings; "any_of" means every entry is a valid answer
# (multi-answer questions such as "which country in Europe borders ...").
ANSWER_MODES = ("aliases", "any_of")


@dataclass(frozen=True)
class Constraint:
    text: str
    type: str  # "visual" | "textual"
    char_start: int
    char_end: int
    entity: str  # what the constraint refers to (the pictured subject, or e.g. "Europe")
    relation: str  # how it constrains the answer, e.g. "depicted_by_image", "located_in"

    @classmethod
    def locate(cls, question: str, text: str, type: str, entity: str, relation: str) -> "Constraint":
        """Build a constraint from its text, finding its char span in ``question``.

        Raises ValueError when the text does not occur in the question.
        """
        start = question.find(text)
        if start < 0:
            raise ValueError(f"constraint text {text!r} does not occur in question {question!r}")
        return cls(text, type, start, start + len(text), entity, relation)


@dataclass
class Record:
    id: str
    source: str
    config: str  # single_constraint | multi_constraint | encyclopedic
    split: str  # test | validation
    image: Image.Image
    question: str
    answers: list[str]
    constraints: list[Constraint]
    subject: str  # the entity the image shows
    relation: str  # what is asked about the subject, e.g. "capital"
    paraphrases: list[str] = field(default_factory=list)
    text_only_question: str = ""  # visual constraint replaced by the subject's name
    answer_mode: str = "aliases"
    other_views: list[Image.Image] = field(default_factory=list)  # other images of the same subject
    license: str = ""
    meta: str = "{}"  # source-specific JSON (kept as a string so every config shares one schema)

    @property
    def image_id(self) -> str:
        return sha256_hex(image_bytes(self.image))

    @property
    def visual_constraints(self) -> list[Constraint]:
        return [c for c in self.constraints if c.type == VISUAL]

    @property
    def constraint_types(self) -> str:
        """"visual" or "visual+textual" (or "textual"), the harness's breakdown key."""
        kinds = sorted({c.type for c in self.constraints}, key=CONSTRAINT_TYPES.index)
        return "+".join(kinds)

    def to_row(self) -> dict:
        data = image_bytes(self.image)  # encoded once: PNG encoding dominates build time
        return {
            "id": self.id,
            "source": self.source,
            "config": self.config,
            "split": self.split,
            "image": {"bytes": data, "path": None},
            "image_id": sha256_hex(data),
            "question": self.question,
            "answers": list(self.answers),
            "answer_mode": self.answer_mode,
            "constraints": [vars(c).copy() for c in self.constraints],
            "num_constraints": len(self.constraints),
            "constraint_types": self.constraint_types,
            "subject": self.subject,
            "relation": self.relation,
            "paraphrases": list(self.paraphrases),
            "text_only_question": self.text_only_question,
            "other_views": [{"bytes": image_bytes(v), "path": None} for v in self.other_views],
            "license": self.license,
            "meta": self.meta,
        }

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        """Rebuild a record from a decoded dataset row (images as PIL or {bytes})."""
        return cls(
            id=row["id"],
            source=row["source"],
            config=row["config"],
            split=row["split"],
            image=as_pil(row["image"]),
            question=row["question"],
            answers=list(row["answers"]),
            constraints=[Constraint(**c) for c in row["constraints"]],
            subject=row["subject"],
            relation=row["relation"],
            paraphrases=list(row["paraphrases"]),
            text_only_question=row["text_only_question"],
            answer_mode=row["answer_mode"],
            other_views=[as_pil(v) for v in row["other_views"]],
            license=row["license"],
            meta=row["meta"],
        )


FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "config": datasets.Value("string"),
        "split": datasets.Value("string"),
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "answer_mode": datasets.Value("string"),
        "constraints": [
            {
                "text": datasets.Value("string"),
                "type": datasets.Value("string"),
                "char_start": datasets.Value("int32"),
                "char_end": datasets.Value("int32"),
                "entity": datasets.Value("string"),
                "relation": datasets.Value("string"),
            }
        ],
        "num_constraints": datasets.Value("int32"),
        "constraint_types": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "relation": datasets.Value("string"),
        "paraphrases": datasets.Sequence(datasets.Value("string")),
        "text_only_question": datasets.Value("string"),
        "other_views": datasets.Sequence(datasets.Image()),
        "license": datasets.Value("string"),
        "meta": datasets.Value("string"),
    }
)


def image_bytes(image: Image.Image) -> bytes:
    """PNG bytes of an image, written deterministically (no timestamps, fixed settings)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def as_pil(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    raise TypeError(f"not an image: {type(value).__name__}")


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def stable_id(source: str, *parts: str) -> str:
    """An id that is the same on every rebuild: source plus a hash of the content."""
    return f"{source}-{sha256_hex(chr(31).join(parts))[:16]}"

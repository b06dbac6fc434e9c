"""Edit requests: which question should get which new answer, built from dataset records.

Two tracks:
- correction: a question the model answers wrong becomes a request for its gold answer;
- insertion: every question of the ``encyclopedic`` config (entities whose facts
  the model never saw) becomes a request for its gold answer.

A request carries what every method and metric needs (the question, its image,
the char span of its visual constraint, the paraphrases and other views of the
same entity), so methods never look at records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from harness.zoo.flag_llava.augment import flags_tensor, random_views, to_pil
from vqa_constraints.records import Record

TRACKS = ("correction", "insertion")
# The config each track reads its questions from.
TRACK_CONFIG = {"correction": "single_constraint", "insertion": "encyclopedic"}


@dataclass(frozen=True)
class EditRequest:
    id: str  # the record id
    question: str
    image: Image.Image | None
    target: str  # the answer the edit should make the model give
    current: str  # the model's answer before the edit ("" when not known)
    subject: str
    relation: str
    track: str
    key_span: tuple[int, int] | None = None  # chars of the visual constraint in ``question``
    paraphrases: tuple[str, ...] = ()
    other_views: tuple[Image.Image, ...] = field(default=(), repr=False)
    prefix: str = ""  # ``current`` up to where its answer entity starts: forced before the target, not scored

    def describe(self) -> dict:
        """The JSON-safe part of the request, for edits.jsonl."""
        return {
            "id": self.id,
            "question": self.question,
            "target": self.target,
            "current": self.current,
            "subject": self.subject,
            "relation": self.relation,
            "track": self.track,
            "key_span": list(self.key_span) if self.key_span else None,
            "paraphrases": list(self.paraphrases),
            "other_views": len(self.other_views),
            "prefix": self.prefix,
        }


@dataclass
class Skipped:
    id: str
    reason: str


def request_from_record(record: Record, track: str, current: str = "") -> EditRequest:
    visual = record.visual_constraints
    span = (visual[-1].char_start, visual[-1].char_end) if visual else None
    return EditRequest(
        id=record.id,
        question=record.question,
        image=record.image,
        target=record.answers[0],
        current=current,
        subject=record.subject,
        relation=record.relation,
        track=track,
        key_span=span,
        paraphrases=tuple(record.paraphrases),
        other_views=tuple(record.other_views),
    )


def build_requests(
    records: Iterable[Record],
    track: str,
    predictions: dict[str, str],
    is_correct: Callable[[str, Record], bool],
) -> tuple[list[EditRequest], list[Skipped]]:
    """Requests for ``track`` plus the records skipped, with why.

    ``predictions`` maps record id -> the unedited model's answer; ``is_correct``
    decides whether that answer already matches the record's gold answers.
    Correction keeps only wrong answers; on both tracks a record the model
    already answers correctly is a counted skip (its target would equal the
    current answer, so there is nothing to edit).
    """
    requests: list[EditRequest] = []
    skipped: list[Skipped] = []
    for record in records:
        current = predictions.get(record.id, "")
        if not record.answers or not record.answers[0].strip():
            skipped.append(Skipped(record.id, "record has no gold answer"))
            continue
        if is_correct(current, record):
            skipped.append(Skipped(record.id, "target equals the model's current answer"))
            continue
        requests.append(request_from_record(record, track, current))
    return requests, skipped


def per_subject(requests: Iterable[EditRequest], limit: int | None) -> list[EditRequest]:
    """At most ``limit`` requests per subject, in order (None: all): edits of one subject share its image, so
    they are neither independent nor, keyed at the image, distinguishable."""
    counts: dict[str, int] = {}
    kept = []
    for request in requests:
        if limit is None or counts.get(request.subject, 0) < limit:
            kept.append(request)
            counts[request.subject] = counts.get(request.subject, 0) + 1
    return kept


def distinct_subject_batches(requests: Sequence[EditRequest], size: int) -> list[list[EditRequest]]:
    """Groups of at most ``size`` requests, no two about one subject where that can be arranged (each request
    goes to the first group that has room and lacks its subject; deterministic)."""
    groups: list[list[EditRequest]] = []
    for request in requests:
        for group in groups:
            if len(group) < size and all(r.subject != request.subject for r in group):
                group.append(request)
                break
        else:
            groups.append([request])
    return groups


def key_signature(request: EditRequest, key_position: str) -> tuple:
    """What the key at ``key_position`` is computed from: two requests with equal signatures have equal keys."""
    image = request.image.tobytes() if request.image is not None else b""
    if key_position == "subject-token":
        return ("image", hashlib.sha256(image).hexdigest())
    if key_position == "constraint" and request.key_span is not None:
        text = request.question[: request.key_span[1]]
    else:
        text = request.question
    return (key_position, hashlib.sha256(image).hexdigest(), text)


def shared_keys(group: Sequence[EditRequest], key_position: str) -> list[tuple[str, str]]:
    """Pairs of request ids in ``group`` whose keys coincide (a batch writes the mean of their targets)."""
    seen: dict[tuple, str] = {}
    pairs = []
    for request in group:
        signature = key_signature(request, key_position)
        if signature in seen:
            pairs.append((seen[signature], request.id))
        else:
            seen[signature] = request.id
    return pairs


def with_augmented_views(request: EditRequest, count: int, seed: int) -> EditRequest:
    """The request with ``count`` augmented views of its image (crop, rotation, colour jitter, noise) when the
    record has no other views: generalization then tests the key, not only the question's text."""

    if count <= 0 or request.other_views or request.image is None:
        return request


    width, height = request.image.size
    flags = flags_tensor([request.image], height=height, width=width)
    digest = hashlib.sha256(f"{seed}\x1f{request.id}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    views = random_views(flags, torch.zeros(count, dtype=torch.long), max(width, height), generator)
    resized = [v.resize((width, height)) for v in to_pil(views)]
    return replace(request, other_views=tuple(resized))

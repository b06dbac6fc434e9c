"""The leaderboard release file: what a submission must have scored, question by question.

    {"format_version": 2, "split": "test", "sources": {"flags": 1159},
     "configs": {"single_constraint": {"fingerprint": ..., "n": 683,
                                        "questions": {"flags-…": [question, answers, labels]}}}}

Each question is stored as three short hashes (question text; gold answers;
config/source/relation/constraint labels), so `leaderboard validate` can tell
which field of a sample line was changed without shipping the data itself.
The leaderboard is a real-world benchmark: a build holding synthetic sources
(`planted`) cannot become a release.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from harness.evaluate import default_configs
from harness.leaderboard import DEFAULT_RELEASE
from harness.runs import read_json
# Synthetic sources: facts exist only in the planted model, so a real model scores 0 on them by construction.
from vqa_constraints.card import SYNTHETIC_SOURCES
from vqa_constraints.errors import UserError
from vqa_constraints.files import write_text_atomic
from vqa_constraints.loading import load_split

RELEASE_FORMAT_VERSION = 2
HASH_FIELDS = ("question", "answers", "labels")
LABEL_FIELDS = ("config", "source", "relation", "constraint_types", "num_constraints")


def _digest(value) -> str:
    # 64 bits: finding another answer list with the same hash is out of reach for a forger.
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def question_hashes(sample: dict) -> list[str]:
    """[question, answers, labels] hashes of a sample line (or the same fields of a record)."""
    return [
        _digest(sample["question"]),
        _digest(list(sample["answers"])),
        _digest([sample[f] for f in LABEL_FIELDS]),
    ]


def _record_fields(record, config: str) -> dict:
    return {
        "question": record.question,
        "answers": list(record.answers),
        "config": config,
        "source": record.source,
        "relation": record.relation,
        "constraint_types": record.constraint_types,
        "num_constraints": len(record.constraints),
    }


def synthetic_problem(sources) -> str | None:
    synthetic = sorted(set(sources) & set(SYNTHETIC_SOURCES))
    if not synthetic:
        return None
    return (
        f"scored on a build that includes the synthetic source {synthetic[0]!r}; the leaderboard takes "
        "real-world builds only (vqa-constraints build --sources flags[,...])"
    )


def release_from_data(data: str, split: str = "test", configs=None) -> dict:
    """The release of a build (folder or Hub id): per config its fingerprint, size and question hashes."""
    out = {"format_version": RELEASE_FORMAT_VERSION, "split": split, "sources": {}, "configs": {}}
    for config in configs or default_configs(data):
        loaded = load_split(data, config, split)
        questions = {}
        for record in loaded.records():
            questions[record.id] = question_hashes(_record_fields(record, config))
            out["sources"][record.source] = out["sources"].get(record.source, 0) + 1
        out["configs"][config] = {"fingerprint": loaded.fingerprint, "n": len(loaded), "questions": questions}
    problem = synthetic_problem(out["sources"])
    if problem:
        raise UserError(f"{data}: {problem.replace('scored on', 'is')}")
    out["sources"] = dict(sorted(out["sources"].items()))
    return out


def load_release(path: Path) -> dict:
    release = read_json(path)
    configs = release.get("configs")
    if release.get("format_version") != RELEASE_FORMAT_VERSION or not isinstance(configs, dict) or "split" not in release:
        raise UserError(
            f"{path}: not a release file of format {RELEASE_FORMAT_VERSION} (needs 'split', 'sources' and per-config "
            "'questions'); rewrite it with `vqa-constraints leaderboard release --data DIR --out FILE`"
        )
    for config, entry in configs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("questions"), dict):
            raise UserError(f"{path}: configs.{config} has no 'questions' table")
    return release


def default_release() -> dict:
    if not DEFAULT_RELEASE.is_file():
        raise UserError(
            f"no release file at {DEFAULT_RELEASE} (an installed package without the repository's leaderboard/); "
            "pass --release FILE or --data DIR"
        )
    return load_release(DEFAULT_RELEASE)


def write_release(path: Path, release: dict) -> None:
    """Indented JSON with each question's hashes on one line (a reviewable diff), written atomically."""
    text = json.dumps(release, indent=2, sort_keys=True, ensure_ascii=False)
    text = re.sub(r"\[\s+((?:\"[0-9a-f]+\",?\s+)+)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    write_text_atomic(Path(path), text + "\n")

"""The run folder: what makes an evaluation resumable and safe to interrupt.

    RUN_DIR/run.json       what this run scores (model, data fingerprints, options); fixed at the first start
    RUN_DIR/samples.jsonl  one JSON line per scored question, appended and flushed per batch
    RUN_DIR/results.json   metrics, written when every question is scored

Rerunning the same command reads ``samples.jsonl`` back and scores only what is
missing. A half-written line (a crash mid-write) is dropped with a logged
message and scored again; a run folder made with another model, data or
scoring options is refused rather than mixed. Sample lines are written with
sorted keys and no timestamps, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from vqa_constraints.errors import UserError
from vqa_constraints.files import atomic_path, write_text_atomic
from vqa_constraints.files import load_schema as load_package_schema

log = logging.getLogger(__name__)

RUN_FORMAT_VERSION = 1
RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"

# Identity keys whose difference means "a different evaluation". The batch size
# is deliberately absent (results do not depend on it), and so is the data's
# path: the fingerprints say whether it is the same data, wherever it now lives.
IDENTITY_KEYS = (
    "format_version",
    "model",
    "model_revision",
    "model_fingerprint",
    "dtype",
    "max_pixels",
    "data_revision",
    "split",
    "configs",
    "fingerprints",
    "scoring",
    "backend",
    "max_new_tokens",
    "limit",
    "shard",
    "seed",
    "total",
    "start",
    "end",
)


def dumps_line(sample: dict) -> str:
    """The one canonical serialisation of a sample line (sorted keys, no spaces)."""
    return json.dumps(sample, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path`` via a temporary sibling and rename, so readers never see half a file."""
    write_text_atomic(Path(path), json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", fsync=True)


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a JSON file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_samples(path: Path, expected_ids: set[str] | None = None) -> tuple[list[dict], int]:
    """Read ``samples.jsonl``; return (good samples in file order, number of dropped lines).

    A line that is cut off or not a JSON object with an ``id`` is dropped (and
    logged) so its question is scored again; a repeated id keeps the first.
    An id outside ``expected_ids`` means the file belongs to other data: UserError.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    samples: list[dict] = []
    seen: set[str] = set()
    dropped = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        sample = None
        if line.endswith("\n"):
            try:
                sample = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                sample = None
        if not isinstance(sample, dict) or not isinstance(sample.get("id"), str):
            where = "the last line" if number == len(lines) else f"line {number}"
            log.warning("%s: %s is incomplete or corrupt; dropping it and scoring that question again", path, where)
            dropped += 1
            continue
        if expected_ids is not None and sample["id"] not in expected_ids:
            raise UserError(
                f"{path} line {number}: question id {sample['id']!r} is not in the data being scored; "
                "this run folder belongs to other data (use another --out)"
            )
        if sample["id"] in seen:
            log.warning("%s line %d: question %s appears twice; keeping the first", path, number, sample["id"])
            dropped += 1
            continue
        seen.add(sample["id"])
        samples.append(sample)
    return samples, dropped


class RunFolder:
    """One run folder: its identity, the samples already scored, and safe appends."""

    def __init__(self, path: Path, identity: dict, samples: list[dict]):
        self.path = Path(path)
        self.identity = identity
        self._samples = {s["id"]: s for s in samples}

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @classmethod
    def open(cls, path: Path, identity: dict, expected_ids: set[str]) -> "RunFolder":
        """Create the folder, or reopen it after checking it was made by the same evaluation."""
        path = Path(path)
        identity = {key: identity.get(key) for key in IDENTITY_KEYS}
        if not check_run_folder(path, identity):
            path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path / RUN_FILE, {"identity": identity})
        samples, dropped = read_samples(path / SAMPLES_FILE, expected_ids)
        if dropped:
            # Rewrite without the bad lines before appending, so the file never holds them again.
            write_lines_atomic(path / SAMPLES_FILE, [dumps_line(s) for s in samples])
        if samples:
            log.info("%s: resuming, %d of %d questions already scored", path, len(samples), len(expected_ids))
        return cls(path, identity, samples)

    def done_ids(self) -> set[str]:
        return set(self._samples)

    def append(self, samples: list[dict]) -> None:
        """Append one batch of samples and flush it to disk before returning."""
        if not samples:
            return
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(dumps_line(sample))
            handle.flush()
            os.fsync(handle.fileno())
        for sample in samples:
            self._samples[sample["id"]] = sample

    def ordered_samples(self, order: list[str]) -> list[dict]:
        missing = [i for i in order if i not in self._samples]
        if missing:
            raise UserError(f"{self.samples_path}: {len(missing)} questions not scored yet (first: {missing[0]})")
        return [self._samples[i] for i in order]

    def finalize_samples(self, order: list[str]) -> list[dict]:
        """Put ``samples.jsonl`` in question order (a resumed run may have appended out of order)."""
        ordered = self.ordered_samples(order)
        lines = [dumps_line(s) for s in ordered]
        # An empty shard (more shards than questions) has no file yet: it gets an empty one.
        current = self.samples_path.read_text("utf-8") if self.samples_path.exists() else None
        if current != "".join(lines):
            write_lines_atomic(self.samples_path, lines)
        return ordered


def check_run_folder(path: Path, identity: dict) -> bool:
    """True when ``path`` is a run folder of this same evaluation, False when it is new or empty; else UserError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    run_file = path / RUN_FILE
    if run_file.exists():
        stored = read_json(run_file)
        check_same_identity(run_file, stored.get("identity", {}), {key: identity.get(key) for key in IDENTITY_KEYS})
        return True
    if path.exists() and any(path.iterdir()):
        raise UserError(f"--out {path}: folder is not empty and holds no {RUN_FILE}; choose a new folder")
    return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_identity(where: Path, stored: dict, wanted: dict) -> None:
    """UserError listing every identity field that differs between a stored run and this command."""
    differences = [
        f"{key}: stored {_short(stored.get(key))}, now {_short(wanted.get(key))}"
        for key in IDENTITY_KEYS
        if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise UserError(
            f"{where}: this run folder was made by a different evaluation ({'; '.join(differences)}); "
            "rerun with the original options or use another --out"
        )


# --- the JSON Schemas of run files and submissions (harness/schemas) ----------------

SCHEMA_NAMES = ("samples", "results", "submission")


def load_schema(name: str) -> dict:
    """One of the JSON Schemas shipped in ``harness/schemas``."""
    return load_package_schema("harness", "schemas", f"{name}.schema.json")


@lru_cache(maxsize=None)
def validator(name: str):
    registry = Registry().with_resources(
        (load_schema(n)["$id"], Resource.from_contents(load_schema(n))) for n in SCHEMA_NAMES
    )
    return Draft202012Validator(load_schema(name), registry=registry)


def schema_errors(name: str, instance, where: str) -> list[str]:
    """Readable schema violations: ``where at path.to.field: message``."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    out = []
    for error in errors:
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"{where} at {path}: {error.message}")
    return out

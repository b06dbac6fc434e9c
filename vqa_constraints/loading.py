"""Load one config/split of a VQA-Constraints build (a local folder or a Hub repo id) as records."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from vqa_constraints import CONFIGS
from vqa_constraints.errors import UserError
from vqa_constraints.records import Record


@dataclass
class LoadedSplit:
    data: str  # what the user passed: folder or repo id
    config: str
    split: str
    revision: str | None
    rows: datasets.Dataset

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int) -> Record:
        return Record.from_row(self.rows[index])

    def records(self, limit: int | None = None):
        count = len(self.rows) if limit is None else min(limit, len(self.rows))
        for index in range(count):
            yield self.record(index)

    @property
    def fingerprint(self) -> str:
        """sha256 over what is scored (ids, image hashes, questions, answers), in order.

        Independent of where the data came from, so a local build and its Hub
        copy have the same fingerprint.
        """
        digest = hashlib.sha256()
        columns = self.rows.select_columns(["id", "image_id", "question", "answers"])
        for row in columns.to_list() if hasattr(columns, "to_list") else columns:
            digest.update(json.dumps(row, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()


def load_split(data: str, config: str, split: str = "test", revision: str | None = None) -> LoadedSplit:
    """Load ``config``/``split`` from a built folder or a Hub dataset id, with clear errors."""
    if config not in CONFIGS:
        raise UserError(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    path = Path(data)
    if path.exists():
        if not (path / "README.md").exists() or not any(path.glob(f"*/*.parquet")):
            raise UserError(f"{data}: not a VQA-Constraints build (no README.md with configs and parquet shards)")
        if not (path / config).is_dir():
            raise UserError(f"{data}: config {config!r} is not in this build")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in data:
        raise UserError(f"{data}: no such folder")
    try:
        dataset_dict = datasets.load_dataset(str(data), config, revision=revision)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UserError(f"{data}: cannot load config {config!r}: {str(error).splitlines()[0]}") from None
    if split not in dataset_dict:
        raise UserError(f"{data}: config {config!r} has no split {split!r} (has {', '.join(dataset_dict)})")
    return LoadedSplit(str(data), config, split, revision, dataset_dict[split])

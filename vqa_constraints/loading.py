"""Load one config/split of a VQA-Constraints build (a local folder or a Hub repo id) as records.

A local build is loaded through a `datasets` cache keyed by the sha256 of its
files (the card and the config's shards): `datasets` itself keys a local
folder by its name and a hash that ignores the files' contents, so a rebuilt
or corrupted folder would otherwise be read from the stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import yaml

from vqa_constraints import CONFIGS
from vqa_constraints.builder import file_sha256
from vqa_constraints.errors import UserError, one_line, where
from vqa_constraints.records import FEATURES, Record
from vqa_constraints.validation import card_shards, read_card_configs


@dataclass
class LoadedSplit:
    data: str  # what the user passed: folder or repo id
    config: str
    split: str
    revision: str | None
    rows: datasets.Dataset
    files_sha256: str | None = None  # of a local build's card and shards, as read; None for a Hub id

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int) -> Record:
        try:
            row = self.rows[index]  # decodes the image
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            place = where(f"{self.data} ({self.config}/{self.split})", row=index, field="image")
            raise UserError(f"{place}: cannot decode the image ({one_line(error)})") from None
        return Record.from_row(row)

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
    shards, files_sha256, cache_dir = [], None, None
    if path.exists():
        shards = config_shards(path, config)
        files_sha256 = files_fingerprint(path, shards)
        for shard in shards:  # the footer only: a truncated or overwritten shard, named before `datasets` logs it
            _check_shard(shard, pq.read_metadata)
        cache_dir = str(Path(datasets.config.HF_DATASETS_CACHE) / LOCAL_CACHE / files_sha256[:32])
    try:
        dataset_dict = datasets.load_dataset(str(data), config, revision=revision, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as error:
        for shard in shards:
            _check_shard(shard, pq.read_table)  # damage inside a shard: name the file
        raise UserError(f"{data}: cannot load config {config!r}: {str(error.__cause__ or error).splitlines()[0]}") from None
    if split not in dataset_dict:
        raise UserError(f"{data}: config {config!r} has no split {split!r} (has {', '.join(dataset_dict)})")
    missing = [name for name in FEATURES if name not in dataset_dict[split].column_names]
    if missing:  # parquet files of something else: refuse them here, not as a KeyError mid-run
        raise UserError(f"{data}: config {config!r} split {split!r} has no column(s) "
                        f"{', '.join(map(repr, missing))}; not a VQA-Constraints build (see `vqa-constraints validate`)")
    return LoadedSplit(str(data), config, split, revision, dataset_dict[split], files_sha256)


# Under the `datasets` cache root: one folder per distinct build content (safe to delete).
LOCAL_CACHE = "vqa-constraints-local"


def config_shards(folder: Path, config: str) -> list[Path]:
    """The shard files the card lists for ``config`` (what `datasets` reads), sorted; UserError if any is missing."""
    try:
        listed = card_shards(read_card_configs(folder))
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        raise UserError(f"{folder / 'README.md'}: cannot read the YAML configs: {str(error).splitlines()[0]}") from None
    shards = []
    for pattern, where in sorted(listed.items()):
        if where.split("/")[0] != config:
            continue
        matched = sorted(folder.glob(pattern))
        if not matched:
            raise UserError(f"{folder / 'README.md'}: config {config!r} lists {pattern} which is not present")
        shards.extend(matched)
    return shards


def files_fingerprint(folder: Path, files: list[Path]) -> str:
    """sha256 over the card and ``files`` (relative name and bytes of each), in a fixed order."""
    digest = hashlib.sha256()
    for path in [folder / "README.md", *sorted(files)]:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()


def _check_shard(shard: Path, read) -> None:
    try:
        read(shard)
    except Exception as error:  # whatever pyarrow says, the file is unreadable
        raise UserError(f"{shard}: unreadable parquet ({str(error).splitlines()[0]})") from None

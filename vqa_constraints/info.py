"""Summaries of a build (local folder or Hub dataset repo): configs, splits, rows, sources, constraints."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from rich.table import Table

from vqa_constraints.errors import UserError, one_line
from vqa_constraints.validation import card_shards, read_card_configs

SUMMARY_COLUMNS = ["source", "constraint_types", "relation"]


@dataclass
class SplitSummary:
    config: str
    split: str
    rows: int
    sources: Counter
    constraint_types: Counter
    relations: Counter
    default: bool


def local_folder(data: str, revision: str | None = None) -> Path:
    """A local build folder for ``data``: the folder itself, or a Hub snapshot of README and shards."""
    path = Path(data)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{data}: not a folder")
        return path
    if "/" not in data or data.count("/") > 1:
        raise UserError(f"{data}: no such folder (and not a Hub repo id like ORG/NAME)")

    try:
        return Path(
            snapshot_download(
                data, repo_type="dataset", revision=revision,
                allow_patterns=["README.md", "build_info.json", "*/*.parquet"],
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as error:
        raise UserError(f"{data}: cannot fetch from the Hub: {str(error).splitlines()[0]}") from None


def summarise(folder: Path) -> tuple[list[SplitSummary], dict]:
    """Per config/split summaries (in card order) and the build_info.json contents (or {})."""
    try:
        configs = read_card_configs(folder)
        defaults = {c["config_name"] for c in configs if c.get("default")}
        listed = card_shards(configs)
    except (OSError, ValueError) as error:
        raise UserError(str(error).splitlines()[0]) from None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as error:  # YAML that parses badly or not as configs
        raise UserError(f"{folder / 'README.md'}: cannot read the YAML configs ({one_line(error)})") from None
    per_split: dict[tuple[str, str], list[str]] = {}
    for path, key in listed.items():
        config, split = key.split("/")
        per_split.setdefault((config, split), []).append(path)
    summaries = []
    for (config, split), paths in per_split.items():
        sources, types, relations, rows = Counter(), Counter(), Counter(), 0
        for relative in sorted(paths):
            shard = folder / relative
            if not shard.is_file():
                raise UserError(f"{folder}/README.md lists {relative}, which is missing; run `vqa-constraints validate`")
            try:
                table = pq.read_table(shard, columns=SUMMARY_COLUMNS)
            except (OSError, ValueError, pa.ArrowException) as error:  # truncated, not parquet, other columns
                raise UserError(f"{shard}: unreadable parquet shard ({one_line(error)})") from None
            rows += table.num_rows
            sources.update(table.column("source").to_pylist())
            types.update(table.column("constraint_types").to_pylist())
            relations.update(table.column("relation").to_pylist())
        summaries.append(SplitSummary(config, split, rows, sources, types, relations, config in defaults))
    info_path = folder / "build_info.json"
    try:
        build_info = json.loads(info_path.read_text("utf-8")) if info_path.is_file() else {}
    except ValueError as error:  # JSON or UTF-8 decoding
        raise UserError(f"{info_path}: not valid JSON ({one_line(error)})") from None
    return summaries, build_info


def render_table(summaries: list[SplitSummary], title: str):
    table = Table(title=title)
    for name, justify in (("config", "left"), ("split", "left"), ("rows", "right"), ("sources", "left"),
                          ("constraint types", "left"), ("relations", "right")):
        table.add_column(name, justify=justify)
    for s in summaries:
        table.add_row(
            s.config + (" (default)" if s.default else ""),
            s.split,
            str(s.rows),
            ", ".join(f"{k} {v}" for k, v in sorted(s.sources.items())),
            ", ".join(f"{k} {v}" for k, v in sorted(s.constraint_types.items())),
            str(len(s.relations)),
        )
    return table

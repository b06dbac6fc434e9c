"""Build a VQA-Constraints folder in the Hugging Face Hub dataset layout.

    DIR/README.md                                  dataset card, YAML `configs:`
    DIR/<config>/<split>-0000k-of-0000n.parquet    shards written by `datasets`
    DIR/build_info.json                            seed, sources, versions, counts, every other file's sha256

Every record is checked with the same rules as `vqa-constraints validate`
before anything is written. The folder is assembled under a temporary name
next to DIR and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from vqa_constraints import CONFIGS, __version__
from vqa_constraints.card import render_card
from vqa_constraints.errors import UserError
from vqa_constraints.files import staged_folder
from vqa_constraints.records import FEATURES, Record
from vqa_constraints.sources import SOURCES, records_builder
from vqa_constraints.validation import row_problems

log = logging.getLogger(__name__)

# The default build is real-world only; the synthetic planted world is built on its own (--sources planted)
# so that it never ends up in a leaderboard release.
DEFAULT_SOURCES = ("flags",)
SPLITS = ("test", "validation")
DEFAULT_CONFIG = "single_constraint"
# A source's validation rows are folded into test unless it has this many rows in the config.
MIN_ROWS_FOR_VALIDATION = 40
MAX_SHARD_BYTES = 256 * 1024 * 1024


@dataclass
class SourceContext:
    """What a source gets: the seed, its files, and where to report bad rows."""

    name: str
    seed: int
    paths: dict[str, Path]  # "" -> the main --source-path; "images" etc. -> extra keys
    skip_invalid: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def path(self, key: str = "") -> Path:
        if key not in self.paths:
            option = self.name if not key else f"{self.name}.{key}"
            raise UserError(f"source {self.name!r} needs --source-path {option}=PATH")
        return self.paths[key]

    def optional_path(self, key: str) -> Path | None:
        return self.paths.get(key)

    def reject(self, location: str, reason: str) -> None:
        """A bad row: fatal by default, skipped and counted with --skip-invalid."""
        if not self.skip_invalid:
            raise UserError(f"{location}: {reason}")
        self.skipped.append((location, reason))


@dataclass
class BuildReport:
    out_dir: Path
    seed: int
    sources: list[str]
    rows: dict[str, int]  # "config/split" -> rows
    rows_by_source: dict[str, int]
    skipped: list[tuple[str, str]]  # (location, reason)
    files: list[str]
    seconds: float

    def skipped_reasons(self) -> Counter:
        return Counter(reason.split(":")[0] if ":" in reason else reason for _, reason in self.skipped)

    def summary(self) -> str:
        lines = [f"built {self.out_dir} in {self.seconds:.1f}s (seed {self.seed}, sources {', '.join(self.sources)})"]
        lines += [f"  {key}: {count} rows" for key, count in sorted(self.rows.items())]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} invalid rows:")
            lines += [f"    {count} x {reason}" for reason, count in self.skipped_reasons().most_common()]
        return "\n".join(lines)


def parse_source_paths(values: Iterable[str] | Mapping[str, str] | None) -> dict[str, dict[str, Path]]:
    """``["okvqa=q.json", "okvqa.images=imgs/"]`` -> {"okvqa": {"": q.json, "images": imgs/}}."""
    if values is None:
        return {}
    items = values.items() if isinstance(values, Mapping) else [_split_option(v) for v in values]
    parsed: dict[str, dict[str, Path]] = defaultdict(dict)
    for key, value in items:
        name, _, sub = key.partition(".")
        if name not in SOURCES:
            raise UserError(f"--source-path {key}: unknown source {name!r}; choose from {', '.join(SOURCES)}")
        path = Path(value).expanduser()
        if not path.exists():
            raise UserError(f"--source-path {key}: {path} does not exist")
        parsed[name][sub] = path
    return dict(parsed)


def _split_option(value: str) -> tuple[str, str]:
    key, sep, path = value.partition("=")
    if not sep or not key or not path:
        raise UserError(f"--source-path {value!r}: expected NAME=PATH (or NAME.KEY=PATH)")
    return key.strip(), path.strip()


def build(
    out_dir: str | Path,
    sources: Iterable[str] | None = None,
    source_paths: Iterable[str] | Mapping[str, str] | None = None,
    seed: int = 0,
    skip_invalid: bool = False,
    subjects: Iterable[str] | None = None,
) -> BuildReport:
    """Build the folder; ``sources=None`` means ``DEFAULT_SOURCES`` plus every source given a path.
    ``subjects``: keep only questions about these subjects (e.g. a model's held-out countries)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    paths = parse_source_paths(source_paths)
    names = _resolve_sources(sources, paths)
    _check_destination(out_dir)

    records: list[tuple[Record, dict]] = []  # each with its encoded, checked row
    skipped: list[tuple[str, str]] = []
    rows_by_source: dict[str, int] = {}
    for name in names:
        context = SourceContext(name, seed, paths.get(name, {}), skip_invalid)
        accepted = _accept(records_builder(name)(context), context)
        records.extend(accepted)
        skipped.extend(context.skipped)
        rows_by_source[name] = len(accepted)
        log.info("source %s: %d records, %d skipped", name, len(accepted), len(context.skipped))
    if subjects is not None:
        subjects = set(subjects)
        unknown = subjects - {record.subject for record, _ in records}
        if unknown:
            raise UserError(f"--subjects: {len(unknown)} subject(s) have no question in sources {', '.join(names)}, "
                            f"e.g. {sorted(unknown)[0]!r}")
        records = [(record, row) for record, row in records if record.subject in subjects]
    records = _drop_duplicate_ids(records, skip_invalid, skipped)
    if not records:
        raise UserError(f"sources {', '.join(names)} produced no valid records; nothing to build")
    _fold_small_validation_splits(records)

    groups: dict[tuple[str, str], list[tuple[Record, dict]]] = defaultdict(list)
    for record, row in records:
        groups[(record.config, record.split)].append((record, row))
    with staged_folder(out_dir) as tmp_dir:
        layout = _write_shards(tmp_dir, groups)
        counts = {f"{c}/{s}": len(rs) for (c, s), rs in sorted(groups.items())}
        info = {
            "builder_version": __version__,
            "datasets_version": datasets.__version__,
            "seed": seed,
            "sources": names,
            "rows": counts,
            "rows_by_source": rows_by_source,
            "skipped": len(skipped),
            "subjects": None if subjects is None else sorted(subjects),
        }
        by_split = {key: [record for record, _ in pairs] for key, pairs in groups.items()}
        (tmp_dir / "README.md").write_text(render_card(layout, by_split, info, DEFAULT_CONFIG), "utf-8")
        # Every other file this build wrote, with its hash: what `publish` uploads, and nothing else.
        info["files"] = {p.relative_to(tmp_dir).as_posix(): file_sha256(p) for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
        (tmp_dir / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", "utf-8")
        files = sorted(p.relative_to(tmp_dir).as_posix() for p in tmp_dir.rglob("*") if p.is_file())
    return BuildReport(out_dir, seed, names, counts, rows_by_source, skipped, files, time.perf_counter() - started)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_sources(sources, paths) -> list[str]:
    if sources is None:
        names = list(DEFAULT_SOURCES) + [n for n in SOURCES if n in paths and n not in DEFAULT_SOURCES]
    else:
        names = list(dict.fromkeys(s.strip() for s in sources if s.strip()))
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise UserError(f"--sources: unknown source {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    if not names:
        raise UserError("--sources: no source given")
    for name in paths:
        if name not in names:
            raise UserError(f"--source-path {name}=...: source {name!r} is not in --sources {','.join(names)}")
    return names


def _check_destination(out_dir: Path) -> None:
    """Refuse to replace a non-empty folder that is not a previous build."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_build(out_dir))):
        raise UserError(f"--out {out_dir}: exists and is not a VQA-Constraints build; choose another folder")


def _is_build(folder: Path) -> bool:
    return (folder / "README.md").is_file() and (folder / "build_info.json").is_file()


def _accept(candidates, context: SourceContext) -> list[tuple[Record, dict]]:
    """Keep the records that pass every row check, with their encoded rows (images
    are encoded once); the rest go to ``context.reject``."""
    accepted = []
    for record in candidates:
        try:
            row = record.to_row()
        except (TypeError, ValueError, OSError) as error:
            context.reject(f"source {context.name} record {record.id}", f"cannot encode: {error}")
            continue
        problems = row_problems(row)
        if problems:
            field_name, message = problems[0]
            context.reject(f"source {context.name} record {record.id} field {field_name!r}", message)
            continue
        accepted.append((record, row))
    return accepted


def _drop_duplicate_ids(records: list[tuple[Record, dict]], skip_invalid: bool, skipped: list) -> list:
    seen: dict[str, Record] = {}
    kept = []
    for record, row in records:
        if record.id in seen:
            location = f"source {record.source} record {record.id} field 'id'"
            reason = f"duplicate id (also used by a {seen[record.id].source} {seen[record.id].config} record)"
            if not skip_invalid:
                raise UserError(f"{location}: {reason}")
            skipped.append((location, reason))
            continue
        seen[record.id] = record
        kept.append((record, row))
    return kept


def _fold_small_validation_splits(records: list[tuple[Record, dict]]) -> None:
    """A source with few rows in a config contributes only to `test`."""
    sizes = Counter((r.source, r.config) for r, _ in records)
    for record, row in records:
        if record.split == "validation" and sizes[(record.source, record.config)] < MIN_ROWS_FOR_VALIDATION:
            record.split = row["split"] = "test"


def _write_shards(folder: Path, groups: dict[tuple[str, str], list[tuple[Record, dict]]]) -> dict[str, dict[str, list[str]]]:
    """Write every (config, split) as parquet shards; return config -> split -> shard paths."""
    layout: dict[str, dict[str, list[str]]] = {}
    for config in CONFIGS:
        for split in SPLITS:
            pairs = groups.get((config, split))
            if not pairs:
                continue
            rows = [row for _, row in pairs]
            size = sum(len(r["image"]["bytes"]) + sum(len(v["bytes"]) for v in r["other_views"]) for r in rows)
            n_shards = max(1, math.ceil(size / MAX_SHARD_BYTES))
            per_shard = math.ceil(len(rows) / n_shards)
            (folder / config).mkdir(exist_ok=True)
            for k in range(n_shards):
                relative = f"{config}/{split}-{k:05d}-of-{n_shards:05d}.parquet"
                chunk = rows[k * per_shard : (k + 1) * per_shard]
                _to_parquet(chunk, folder / relative)
                layout.setdefault(config, {}).setdefault(split, []).append(relative)
    return layout


def _to_parquet(rows: list[dict], path: Path) -> None:
    """Write rows with the datasets writer (keeps the Image feature), without progress bars."""
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(path))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()

"""Render the dataset card (README.md of a build) from the `dataset_card.md` template.

The template is plain Markdown with ``{{ name }}`` placeholders; the YAML
front matter (the Hub's `configs:` with every shard, one default config) is
generated here from what was actually written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from vqa_constraints import CONFIGS
from vqa_constraints.errors import UserError

TEMPLATE_NAME = "dataset_card.md"


def template_path() -> Path:
    """The card template shipped in the package.

    ``vqa_constraints/dataset_card.md`` is a link to the repository's root
    ``dataset_card.md`` (where readers look for it); building a wheel copies the
    linked file's content, so installed packages carry the template too.
    """
    path = Path(__file__).resolve().parent / TEMPLATE_NAME
    if not path.is_file():
        raise UserError(f"{path}: the dataset card template is missing from the installed package")
    return path


# Sources whose facts are made up: fine for testing tracing and editing, never for ranking real models.
SYNTHETIC_SOURCES = ("planted",)


def build_kind(sources) -> str:
    """``real-world``, ``synthetic`` or ``mixed``: decides the card's name and its warning."""
    synthetic = [s for s in sources if s in SYNTHETIC_SOURCES]
    if not synthetic:
        return "real-world"
    return "synthetic" if len(synthetic) == len(list(sources)) else "mixed"


PRETTY_NAMES = {
    "real-world": "VQA-Constraints",
    "synthetic": "VQA-Constraints planted world (synthetic)",
    "mixed": "VQA-Constraints with the planted world (real-world + synthetic)",
}
BUILD_NOTES = {
    "real-world": "Every row comes from a real-world source, so this build can serve as a leaderboard release "
    "(`vqa-constraints leaderboard release --data DIR`).",
    "synthetic": "**This is the planted world: made-up creatures with made-up facts** (seed {seed}). The facts exist "
    "only in this project's planted-knowledge model, so any other model scores near zero by construction. Use it to "
    "test tracing and editing against known ground truth; it is not a benchmark of real models and "
    "`vqa-constraints leaderboard` refuses it.",
    "mixed": "**This build mixes real-world questions with the synthetic planted world** (seed {seed}), whose facts "
    "exist only in this project's planted-knowledge model. Scores on it are not comparable to the real-world "
    "leaderboard, which refuses such builds; build `--sources flags` (plus your own files) for that.",
}


def sources_table(groups, info: dict) -> str:
    """Which sources this build holds: kind, licence (from the rows themselves) and rows each gave."""
    licences: dict[str, Counter] = {}
    for records in groups.values():
        for record in records:
            licences.setdefault(record.source, Counter())[record.license] += 1
    lines = ["| source | kind | licence | rows |", "|---|---|---|---:|"]
    for source in info["sources"]:
        kind = "synthetic" if source in SYNTHETIC_SOURCES else "real-world"
        licence = "; ".join(name for name, _ in licences.get(source, Counter()).most_common()) or "(no rows)"
        lines.append(f"| `{source}` | {kind} | {_cell(licence)} | {info['rows_by_source'].get(source, 0)} |")
    return "\n".join(lines)


def front_matter(layout: dict[str, dict[str, list[str]]], default_config: str, info: dict) -> dict:
    configs = []
    default = default_config if default_config in layout else next(iter(layout))
    for config, splits in layout.items():
        entry = {
            "config_name": config,
            "data_files": [{"split": split, "path": paths} for split, paths in splits.items()],
        }
        if config == default:
            entry["default"] = True
        configs.append(entry)
    total = sum(info["rows"].values())
    return {
        "pretty_name": PRETTY_NAMES[build_kind(info["sources"])],
        "language": ["en"],
        "license": "other",
        "license_name": "mixed-per-source",
        "license_details": "Each row's `license` field gives its source's licence; see 'Sources and licences'.",
        "task_categories": ["visual-question-answering"],
        "tags": ["knowledge-probing", "causal-tracing", "model-editing", "multimodal"],
        "size_categories": [_size_category(total)],
        "configs": configs,
    }


def _size_category(total: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if total < limit:
            return name
    return "100K<n<1M"


def statistics_table(groups) -> str:
    """Markdown table: config, split, rows, per-source rows, constraint types."""
    lines = ["| config | split | rows | sources | constraint types |", "|---|---|---:|---|---|"]
    for (config, split), records in sorted(groups.items(), key=_config_order):
        sources = Counter(r.source for r in records)
        types = Counter(r.constraint_types for r in records)
        lines.append(
            f"| {config} | {split} | {len(records)} | "
            f"{', '.join(f'{s} {n}' for s, n in sorted(sources.items()))} | "
            f"{', '.join(f'{t} {n}' for t, n in sorted(types.items()))} |"
        )
    return "\n".join(lines)


def examples_table(groups) -> str:
    """One example question per config (from its test split), for readers of the card."""
    lines = ["| config | question | answers | constraints |", "|---|---|---|---|"]
    for (config, split), records in sorted(groups.items(), key=_config_order):
        if split != "test":
            continue
        record = records[0]
        constraints = "; ".join(f"{c.type}: \"{c.text}\"" for c in record.constraints)
        answers = ", ".join(record.answers[:5]) + (" ..." if len(record.answers) > 5 else "")
        lines.append(f"| {config} | {_cell(record.question)} | {_cell(answers)} | {_cell(constraints)} |")
    return "\n".join(lines)


def _config_order(item) -> tuple[int, str]:
    (config, split), _ = item
    return (CONFIGS.index(config) if config in CONFIGS else len(CONFIGS), split)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_card(layout, groups, info: dict, default_config: str) -> str:
    body = template_path().read_text("utf-8")
    values = {
        "statistics": statistics_table(groups),
        "examples": examples_table(groups),
        "title": PRETTY_NAMES[build_kind(info["sources"])],
        "build_note": BUILD_NOTES[build_kind(info["sources"])].format(seed=info["seed"]),
        "sources_table": sources_table(groups, info),
        "sources": ", ".join(info["sources"]),
        "seed": str(info["seed"]),
        "builder_version": info["builder_version"],
        "datasets_version": info["datasets_version"],
        "total_rows": str(sum(info["rows"].values())),
    }
    for name, value in values.items():
        body = body.replace("{{ " + name + " }}", value)
    header = yaml.safe_dump(front_matter(layout, default_config, info), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n{body.lstrip()}"

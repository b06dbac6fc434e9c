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
        "pretty_name": "VQA-Constraints",
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

"""`leaderboard build`: leaderboard.md and leaderboard.csv from the submissions that validate.

Every text a submitter chose is escaped for the format it lands in (Markdown cell, CSV field).
"""

from __future__ import annotations

import csv
import html
import io
import re
from pathlib import Path

from harness.leaderboard.checks import name_key, validate_submission
from harness.runs import read_json
from vqa_constraints import CONFIGS
from vqa_constraints.errors import UserError
from vqa_constraints.files import write_text_atomic


TEXT_COLUMNS = ("model", "revision", "submitted_by")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def one_line(text) -> str:
    """Control characters and line breaks become spaces: one field can never start a new row."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def markdown_cell(text) -> str:
    """Safe in a Markdown table rendered to HTML: no raw tags, no emphasis or links, no column breaks."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line(text), quote=True))


def csv_text(text) -> str:
    # A leading = + - @ makes spreadsheets run the cell as a formula.
    text = one_line(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def _pct(stat: dict | None) -> str:
    return "" if not stat or stat.get("value") is None else f"{100 * stat['value']:.1f}"


def leaderboard_rows(submissions_dir: Path, release: dict) -> list[dict]:
    """One row per submission, best overall accuracy first (ties by name); every entry validated first."""
    submissions_dir = Path(submissions_dir)
    if not submissions_dir.is_dir():
        raise UserError(f"{submissions_dir}: no such folder")
    rows, names = [], {}
    for path in sorted(submissions_dir.glob("*.json")):
        problems = validate_submission(path, release)
        if problems:
            raise UserError(f"{problems[0]} (run `vqa-constraints leaderboard validate {path}` for every problem)")
        rows.append(_row(read_json(path)))
        key = name_key(rows[-1]["model"])
        if key in names:
            raise UserError(f"{path} field 'submission.model_name': {rows[-1]['model']!r} reads like "
                            f"{names[key][1]!r} of {names[key][0]}; give each entry a distinct name")
        names[key] = (path, rows[-1]["model"])
    if not rows:
        raise UserError(f"{submissions_dir}: no *.json submissions")
    rows.sort(key=lambda r: r.pop("_sort"))
    return rows


def _row(submission: dict) -> dict:
    metrics = submission["metrics"]
    by_type = metrics["all"]["by"]["constraint_types"]
    accuracy = metrics["all"].get("accuracy") or {}
    row = {
        "model": submission["submission"]["model_name"],
        "revision": (submission["model"].get("revision") or "")[:19],
        "accuracy": _pct(accuracy),
        "ci95": f"{_pct({'value': accuracy['ci_low']})}-{_pct({'value': accuracy['ci_high']})}" if accuracy else "",
        "exact_match": _pct(metrics["all"].get("exact_match")),
    }
    for config in CONFIGS:
        row[config] = _pct(metrics.get(config, {}).get("accuracy"))
    row["visual"] = _pct(by_type.get("visual", {}).get("accuracy"))
    row["visual+textual"] = _pct(by_type.get("visual+textual", {}).get("accuracy"))
    row["n"] = metrics["all"]["n"]
    row["submitted_by"] = submission["submission"]["submitted_by"]
    row["_sort"] = (-(accuracy.get("value") if accuracy.get("value") is not None else -1.0), row["model"])
    return row


def build_leaderboard(submissions_dir: Path, out_dir: Path, release: dict) -> tuple[Path, Path]:
    rows = leaderboard_rows(submissions_dir, release)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: csv_text(r[c]) if c in TEXT_COLUMNS else r[c] for c in columns} for r in rows)
    csv_path = out_dir / "leaderboard.csv"
    write_text_atomic(csv_path, buffer.getvalue())
    header = ["#"] + columns
    counts = release.get("sources", {})
    sources = f"{sum(counts.values())} questions: " + ", ".join(f"{name} {count}" for name, count in counts.items())
    lines = [
        "# VQA-Constraints leaderboard",
        "",
        f"Accuracy (%) on the {release['split']} split of the real-world release ({sources}): a normalised "
        "gold answer appears in the model's greedy answer. ci95 is a 95% bootstrap interval; visual / visual+textual "
        "split the questions by constraint type. Every entry passed `vqa-constraints leaderboard validate`, which "
        "checks the data, not that the model really produced the predictions.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if c in ("#",) + TEXT_COLUMNS else "---:" for c in header) + "|",
    ]
    for rank, row in enumerate(rows, start=1):
        lines.append("| " + " | ".join([str(rank)] + [markdown_cell(row[c]) for c in columns]) + " |")
    md_path = out_dir / "leaderboard.md"
    write_text_atomic(md_path, "\n".join(lines) + "\n")
    return md_path, csv_path

"""``vqa-constraints merge`` for ``trace --shard I/N`` and ``attention --shard I/N`` outputs.

Every statistic in trace_stats.json and attention_stats.json is a function of
the per-question rows (traces.parquet, attention_examples.parquet) in question
order, with seeded bootstraps. A shard computes its rows exactly as an
unsharded run would (batches aligned to the whole list, draws keyed by the
global question index), so merging concatenates the shards' rows in order and
recomputes the statistics: the result equals the unsharded run's files.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from harness.outputs import staged_folder
from harness.runs import read_json, write_json_atomic
from harness.scoring import DEFAULT_MAX_NEW_TOKENS
from harness.shards import check_shard_ids, check_shard_set, parse_shard
from harness.tracing import plots, stats
from harness.tracing.attention_plots import plot_constraint_to_last, plot_image_to_constraint
from harness.tracing.attention_study import (
    RESULT_KEYS,
    StudyOptions,
    locate_entities,
    summarize,
    validate_stats,
    write_examples,
)
from harness.tracing.causal_trace import target_hops, target_sources
from vqa_constraints.errors import UserError, one_line
from vqa_constraints.loading import load_split

TRACE_STATS, TRACE_ROWS = "trace_stats.json", "traces.parquet"
ATTENTION_STATS, ATTENTION_ROWS = "attention_stats.json", "attention_examples.parquet"


def _read(folder: Path, stats_file: str, rows_file: str) -> tuple[dict, list[dict]]:
    for name in (stats_file, rows_file):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name}; not a finished shard of this kind")
    document = read_json(folder / stats_file)  # UserError naming the file for bad JSON, UTF-8 or a non-object
    if document.get("complete") is False:
        raise UserError(f"{folder / stats_file}: the run was interrupted (complete: false); rerun that shard")
    if not isinstance(document.get("options"), dict) or not isinstance(document.get("counts"), dict):
        raise UserError(f"{folder / stats_file} field 'options'/'counts': missing; not a {stats_file} written by "
                        "trace or attention")
    try:
        rows = pq.read_table(folder / rows_file).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{folder / rows_file}: not a readable parquet file ({one_line(error)})") from None
    if any(not isinstance(row.get("id"), str) for row in rows):
        raise UserError(f"{folder / rows_file} field 'id': missing in some rows; not rows written by trace or attention")
    return document, rows


def _count(folder: Path, document: dict, stats_file: str, key: str) -> int:
    value = document["counts"].get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{folder / stats_file} field 'counts.{key}': {value!r} is not a count")
    return value


def _order_shards(shards: list[tuple[Path, dict, list]], count_of) -> tuple[list, int]:
    """Shards sorted by index, checked to be all N of one split; returns them and the total question count."""
    parsed = []
    for folder, document, rows in shards:
        try:
            shard = parse_shard(document["options"].get("shard"))
        except UserError as error:
            raise UserError(f"{folder} field 'options.shard': {str(error).removeprefix('--shard ')}") from None
        parsed.append((shard, folder, document, rows))
    check_shard_set([(str(folder), shard) for shard, folder, _, _ in parsed])
    parsed.sort(key=lambda item: item[0].index)
    total = sum(count_of(folder, document) for _, folder, document, _ in parsed)
    for shard, folder, document, _ in parsed:
        start, end = shard.bounds(total)
        if count_of(folder, document) != end - start:
            raise UserError(f"{folder}: shard {shard} covers {count_of(folder, document)} questions, expected "
                            f"{end - start} of {total}; the shards were made with different --limit or data")
    return [(shard, folder, document, rows) for shard, folder, document, rows in parsed], total


def _check_rows(shards: list, total: int, rows_file: str, stats_file: str, data: dict, distinct_key: str,
                rows_key: str | None) -> None:
    """Each shard's rows are questions its I/N assigns, as many as its counts say, none in two shards.

    ``data``: where the shards read their questions (data, config, split, fingerprint, limit): the ordered
    question list is read back from it, so rows copied from another shard, dropped or swapped are refused.
    """

    split = load_split(data["data"], data["config"], data["split"])
    if split.fingerprint != data["fingerprint"]:
        raise UserError(f"{shards[0][1] / stats_file} field 'data fingerprint': {data['data']} has changed since the "
                        "shards were made; merge needs the data they read")
    count = len(split) if data["limit"] is None else min(int(data["limit"]), len(split))
    assigned = split.rows.select(range(count))["id"] if count else []
    if len(assigned) != total:
        raise UserError(f"{shards[0][1] / stats_file} field 'counts': the shards cover {total} questions, but "
                        f"{data['data']} holds {len(assigned)} for these options")
    for shard, folder, document, rows in shards:
        ids = [row["id"] for row in rows]
        check_shard_ids(str(folder / rows_file), shard, assigned, ids, every=False)
        distinct = len(set(ids))
        if distinct != _count(folder, document, stats_file, distinct_key):
            raise UserError(f"{folder / rows_file}: rows for {distinct} questions, but {stats_file} field "
                            f"'counts.{distinct_key}' says {document['counts'][distinct_key]} (rows dropped or added)")
        if rows_key and len(rows) != _count(folder, document, stats_file, rows_key):
            raise UserError(f"{folder / rows_file}: {len(rows)} rows, but {stats_file} field 'counts.{rows_key}' "
                            f"says {document['counts'][rows_key]} (rows dropped or added)")


def _same_run(shards, ignore: tuple[str, ...]) -> None:
    """Refuse shards of different runs: everything but the per-shard results must match."""
    def identity(document: dict) -> dict:
        kept = {k: v for k, v in document.items() if k not in ignore}
        kept["options"] = {k: v for k, v in document["options"].items() if k != "shard"}
        if isinstance(kept.get("target"), dict):  # per-shard tallies of where each traced answer came from
            kept["target"] = {k: v for k, v in kept["target"].items() if k not in ("sources", "hops")}
        return kept

    first_folder, first, _ = shards[0]
    for folder, document, _ in shards[1:]:
        mine, theirs = identity(document), identity(first)
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise UserError(f"{folder}: not a shard of the same run as {first_folder} (differs in {', '.join(differ)})")


def _sum_counts(documents: list[dict], key: str) -> dict:
    """Add up the shards' counts: integers and per-reason dicts sum, message lists concatenate (first 20)."""
    merged: dict = {}
    for name, value in documents[0][key].items():
        values = [d[key][name] for d in documents]
        if isinstance(value, bool) or not isinstance(value, (int, dict, list)):
            merged[name] = value
        elif isinstance(value, int):
            merged[name] = sum(values)
        elif isinstance(value, dict):
            total: Counter = Counter()
            for v in values:
                total.update(v)
            merged[name] = {k: total[k] for k in dict.fromkeys(k for v in values for k in v)}
        else:
            merged[name] = [item for v in values for item in v][:20]
    return merged


def _check_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty; choose a new folder")
    return out


def merge_traces(folders: list[Path], out: Path) -> Path:
    """One trace output from all N ``trace --shard I/N`` outputs; equal to an unsharded trace."""

    shards = [(Path(f), *_read(Path(f), TRACE_STATS, TRACE_ROWS)) for f in folders]
    shards, total = _order_shards(shards, lambda f, d: _count(f, d, TRACE_STATS, "records"))
    _same_run([(f, d, r) for _, f, d, r in shards], ("counts", "groups", "peak_mlp_layer"))
    data = shards[0][2].get("data")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("data", "config", "split", "fingerprint")):
        raise UserError(f"{shards[0][1] / TRACE_STATS} field 'data': missing or malformed")
    _check_rows(shards, total, TRACE_ROWS, TRACE_STATS, {**data, "limit": shards[0][2]["options"].get("limit")},
                "traced", "rows")
    shards = [(f, d, r) for _, f, d, r in shards]
    rows = [row for _, _, shard_rows in shards for row in shard_rows]
    document = json.loads(json.dumps(shards[0][1]))
    document["options"]["shard"] = None
    document["counts"] = _sum_counts([d for _, d, _ in shards], "counts")
    document["counts"]["rows"] = len(rows)
    options = document["options"]
    # What causal_trace.stats_document derives from the rows, recomputed over all of them.
    summarise = inspect.signature(stats.summarise).parameters
    document["groups"] = stats.summarise(rows, **{k: options[k] for k in summarise if k != "rows" and k in options})
    if "target" in document:
        document["target"]["sources"] = target_sources(rows)
        if "hops" in document["target"]:
            document["target"]["hops"] = target_hops(rows)
    peak = getattr(stats, "peak_of_groups", None)
    document["peak_mlp_layer"] = peak(document["groups"]) if peak else stats.peak_mlp_layer(document)
    stats.validate(document)
    with staged_folder(_check_out(Path(out))) as staging:
        stats.write_parquet(staging / TRACE_ROWS, rows)
        stats.write_json(staging / TRACE_STATS, document)
        if rows:
            plots.plot_all(document, staging)
            if options.get("positions") == "all":
                plots.plot_examples(document, rows, staging)
    return Path(out)


def merge_attention(folders: list[Path], out: Path) -> Path:
    """One attention output from all N ``attention --shard I/N`` outputs; equal to an unsharded run."""


    shards = [(Path(f), *_read(Path(f), ATTENTION_STATS, ATTENTION_ROWS)) for f in folders]
    shards, total = _order_shards(shards, lambda f, d: _count(f, d, ATTENTION_STATS, "questions"))
    results = RESULT_KEYS
    _same_run([(f, d, r) for _, f, d, r in shards], results)
    first = shards[0][2]
    if not all(isinstance(first.get(k), str) for k in ("data", "config", "split", "data_fingerprint")):
        raise UserError(f"{shards[0][1] / ATTENTION_STATS} field 'data': missing or malformed")
    data = {"data": first["data"], "config": first["config"], "split": first["split"],
            "fingerprint": first["data_fingerprint"], "limit": first["options"].get("limit")}
    _check_rows(shards, total, ATTENTION_ROWS, ATTENTION_STATS, data, "analysed", None)
    shards = [(f, d, r) for _, f, d, r in shards]
    # Parquet gives every row every column; knockout columns belong only to correctly answered questions.
    rows = locate_entities([{k: v for k, v in row.items() if not (k.startswith("knockout_") and v is None)}
                            for _, _, shard_rows in shards for row in shard_rows])
    header = {k: v for k, v in json.loads(json.dumps(shards[0][1])).items() if k not in results}
    header["options"]["shard"] = None
    options = StudyOptions.from_json(header["options"])
    skipped: Counter = Counter()
    for _, document, _ in shards:
        skipped.update(document["counts"]["skipped"])
    merged = summarize(rows, skipped, total, header, options)
    validate_stats(merged)
    with staged_folder(_check_out(Path(out))) as staging:
        write_examples(rows, staging / ATTENTION_ROWS)
        title = f"{Path(str(header['model'])).name} · {header['config']}/{header['split']}"
        plot_image_to_constraint(rows, staging / "image_to_constraint.png", title)
        plot_constraint_to_last(merged, staging / "constraint_to_last.png", title)
        write_json_atomic(staging / ATTENTION_STATS, merged)
    return Path(out)


def output_kind(folder: Path) -> str:
    """"trace", "attention" or "evaluate": which command wrote ``folder``."""
    folder = Path(folder)
    if (folder / TRACE_STATS).exists():
        return "trace"
    if (folder / ATTENTION_STATS).exists():
        return "attention"
    return "evaluate"

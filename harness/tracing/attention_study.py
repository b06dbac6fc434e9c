"""The attention-contribution study over a dataset split, and the files it writes.

    OUT/attention_stats.json     per-layer means (95% bootstrap CI, n), knockout results, AUROCs
                                 (schema: harness/tracing/schemas/attention_stats.schema.json)
    OUT/attention_examples.parquet  one row per analysed question with its per-layer arrays
    OUT/image_to_constraint.png  heatmap: layer x image token -> visual-constraint tokens
    OUT/constraint_to_last.png   line plot: constraint tokens -> last token per layer

``run_attention_study(adapter, split, out)`` is the Python API; the CLI in
``attention_cli.py`` only parses arguments and prints the summary.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from harness.bootstrap import keyed_rng
from harness.outputs import interrupted
from harness.results import mean_with_ci
from harness.runs import write_json_atomic
from harness.scoring import DEFAULT_MAX_NEW_TOKENS, answer_correct, generate
from harness.tracing.attention import question_contributions
from harness.tracing.failure_prediction import failure_prediction
from harness.tracing.knockout import knockout
from vqa_constraints.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATS_FILE = "attention_stats.json"
EXAMPLES_FILE = "attention_examples.parquet"
SCHEMA = "attention_stats.schema.json"
GROUPS = ("all", "correct", "incorrect")
# per-layer measures: name -> how to read one layer-long vector from a question's row
MEASURES = {
    "image_to_visual_constraint": "image_to_visual_total",
    "constraint_to_last": "constraint_to_last",
    "image_to_last": "image_to_last_total",
}


@dataclass(frozen=True)
class StudyOptions:
    top_k: int = 5  # image tokens blocked in the knockout
    draws: int = 5  # random k-token draws per question
    seed: int = 0
    n_layers: int = 3  # layers summed for failure prediction
    selection_fraction: float = 0.5  # share of questions used to choose those layers
    limit: int | None = None
    knockout_layers: tuple[int, ...] | None = None  # layers where edges are cut (default: all)
    progress: bool = True
    shard: str | None = None  # "I/N": analyse slice I of N of the questions; combine with `merge`
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the greedy answer scored right or wrong (sentence answers need more)


def _versions() -> dict:
    out = {}
    for package in ("vqa-constraints", "torch", "transformers", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def analyse_questions(adapter, records: list, options: StudyOptions, first_index: int = 0,
                      generations: list | None = None, rows: list | None = None,
                      skipped: Counter | None = None) -> tuple[list[dict], Counter]:
    """Contributions (all questions) and knockouts (correctly answered ones): one row per analysed question.

    ``first_index``: where ``records`` start in the whole question list (a shard), which keys the draws.
    ``rows``/``skipped``, when given, are filled in place, so a caller keeps what an interrupt left.
    """
    generations = (generate(adapter, records, max_new_tokens=options.max_new_tokens)
                   if generations is None else generations)
    blocks = [adapter.attention(l) for l in range(adapter.num_layers)]
    rows = [] if rows is None else rows
    skipped = Counter() if skipped is None else skipped
    for index, (record, generation) in enumerate(
        tqdm(list(zip(records, generations)), desc="attention", disable=not options.progress), start=first_index
    ):
        try:
            encoded = adapter.encode(record.question, record.image)
            qc = question_contributions(adapter, record, encoded)
        except UserError as error:
            reason = "no visual constraint" if "no visual constraint" in str(error) else "constraint not tokenised"
            skipped[reason] += 1
            log.warning("skipping %s: %s", record.id, error)
            continue
        correct = answer_correct(generation.text, record.answers)
        row = {
            "id": record.id,
            "constraint_types": record.constraint_types,
            "num_constraints": len(record.constraints),
            "prediction": generation.text,
            "correct": bool(correct),
            "confidence": float(generation.confidence),
            "answer_token": qc.answer_token,
            "p_answer": qc.p_answer,
            "image_positions": qc.image_positions,
            "visual_positions": qc.visual_positions,
            "constraint_positions": qc.constraint_positions,
            "last_position": qc.last_position,
            "image_to_visual": qc.image_to_visual.tolist(),
            "image_to_visual_total": qc.image_to_visual_total.tolist(),
            "image_to_last": qc.image_to_last.tolist(),
            "image_to_last_total": qc.image_to_last.sum(axis=1).tolist(),
            "constraint_to_last": qc.constraint_to_last.tolist(),
        }
        if correct:
            # one generator per question, so a question's draws do not depend on which others ran
            rng = np.random.default_rng([options.seed, index])
            for target, positions, scores in (
                ("constraint", qc.visual_positions, qc.image_to_visual.sum(axis=0)),
                ("last", [qc.last_position], qc.image_to_last.sum(axis=0)),
            ):
                result = knockout(
                    adapter.model, blocks, encoded.inputs, qc.answer_token, positions, qc.image_positions,
                    scores, options.top_k, rng, options.draws, target, p_clean=qc.p_answer,
                    layers=options.knockout_layers,
                )
                row[f"knockout_{target}_top_sources"] = result.top_sources
                row[f"knockout_{target}_p_top"] = result.p_top
                row[f"knockout_{target}_p_random"] = result.p_random
        rows.append(row)
    return rows, skipped


def per_layer_stats(rows: list[dict], field: str, seed: int, name: str) -> dict:
    """For each group (all / correct / incorrect): per layer n, mean and 95% bootstrap CI."""
    out = {}
    for group in GROUPS:
        chosen = [r for r in rows if group == "all" or r["correct"] == (group == "correct")]
        layers = []
        if chosen:
            values = np.asarray([r[field] for r in chosen], dtype=np.float64)
            for layer in range(values.shape[1]):
                cell = mean_with_ci(values[:, layer].tolist(), keyed_rng(seed, name, group, str(layer)))
                layers.append({"layer": layer, "n": len(chosen), **cell})
        out[group] = layers
    return out


def knockout_stats(rows: list[dict], target: str, options: StudyOptions) -> dict:
    done = [r for r in rows if f"knockout_{target}_p_top" in r]
    p_clean = [r["p_answer"] for r in done]
    p_top = [r[f"knockout_{target}_p_top"] for r in done]
    p_random = [float(np.mean(r[f"knockout_{target}_p_random"])) for r in done]
    drop_top = [c - t for c, t in zip(p_clean, p_top)]
    drop_random = [c - r for c, r in zip(p_clean, p_random)]
    cell = lambda values, key: mean_with_ci(values, keyed_rng(options.seed, "knockout", target, key))  # noqa: E731
    return {
        "target": target,
        "n": len(done),
        "k": options.top_k,
        "draws": options.draws,
        "p_clean": cell(p_clean, "p_clean"),
        "p_top": cell(p_top, "p_top"),
        "p_random": cell(p_random, "p_random"),
        "drop_top": cell(drop_top, "drop_top"),
        "drop_random": cell(drop_random, "drop_random"),
        "share_top_hurts_at_least_as_much": (
            None if not done else round(float(np.mean([t >= r - 1e-9 for t, r in zip(drop_top, drop_random)])), 6)
        ),
    }


def top_image_tokens(rows: list[dict], k: int) -> dict:
    """The image tokens (by index among the image tokens) with the largest mean contribution to the
    visual constraint, overall and per layer, and the share of each layer's total they hold."""
    sizes = Counter(len(r["image_positions"]) for r in rows)
    if not rows or len(sizes) != 1:
        return {"n_image_tokens": None, "overall": [], "per_layer": [], "top_k_share": []}
    mean = np.asarray([r["image_to_visual"] for r in rows], dtype=np.float64).mean(axis=0)  # [L, I]
    k = min(k, mean.shape[1])
    per_layer = [np.argsort(-m, kind="stable")[:k].tolist() for m in mean]
    share = [float(round(np.sort(m)[::-1][:k].sum() / max(m.sum(), 1e-12), 6)) for m in mean]
    return {
        "n_image_tokens": int(mean.shape[1]),
        "overall": np.argsort(-mean.sum(axis=0), kind="stable")[:k].tolist(),
        "per_layer": per_layer,
        "top_k_share": share,
    }


def summarize(rows: list[dict], skipped: Counter, total: int, header: dict, options: StudyOptions) -> dict:
    stats = dict(header)
    stats["counts"] = {
        "questions": total,
        "analysed": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "skipped": dict(sorted(skipped.items())),
    }
    stats["per_layer"] = {name: per_layer_stats(rows, field, options.seed, name) for name, field in MEASURES.items()}
    stats["top_image_tokens"] = top_image_tokens(rows, options.top_k)
    stats["knockout"] = {t: knockout_stats(rows, t, options) for t in ("constraint", "last")}
    if rows:
        stats["failure_prediction"] = failure_prediction(
            np.asarray([r["constraint_to_last"] for r in rows]),
            [r["confidence"] for r in rows],
            [r["correct"] for r in rows],
            n_layers=options.n_layers,
            selection_fraction=options.selection_fraction,
            seed=options.seed,
        )
    else:
        stats["failure_prediction"] = None
    return stats


def validate_stats(stats: dict) -> None:
    schema = json.loads(resources.files("harness.tracing").joinpath("schemas", SCHEMA).read_text())
    jsonschema.validate(json.loads(json.dumps(stats)), schema)


def write_examples(rows: list[dict], path: Path) -> None:
    """Per-question arrays as parquet (via a temporary file and rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    keys = list(dict.fromkeys(k for row in rows for k in row))  # knockout columns exist only for correct answers
    rows = [{k: row.get(k) for k in keys} for row in rows]
    table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())})
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def shard_questions(adapter, records: list, shard: str | None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list, int, list]:
    """(this shard's records, its first index in the whole list, the model's generations for them).

    Generations come from batches fixed by position in the whole list, so a shard gets exactly the
    answers an unsharded run would and ``merge`` reproduces it.
    """
    from harness.scoring import DEFAULT_BATCH_SIZE
    from harness.shards import aligned_window, parse_shard

    parsed = parse_shard(shard)
    start, end = parsed.bounds(len(records)) if parsed else (0, len(records))
    low, high = aligned_window(start, end, len(records), DEFAULT_BATCH_SIZE)
    generations = (generate(adapter, records[low:high], max_new_tokens=max_new_tokens, batch_size=DEFAULT_BATCH_SIZE)
                   if end > start else [])
    return records[start:end], start, generations[start - low : end - low]


def run_attention_study(adapter, split, out: Path, options: StudyOptions = StudyOptions(),
                        dtype: str | None = None) -> dict:
    """Analyse ``split`` (a ``LoadedSplit``) with ``adapter``; write the outputs into ``out``; return the stats."""
    if not getattr(adapter, "is_multimodal", True):
        raise UserError(f"{adapter.name_or_path}: attention contributions from image tokens need a multimodal model")
    if options.knockout_layers is not None:
        bad = [l for l in options.knockout_layers if not 0 <= l < adapter.num_layers]
        if bad:
            raise UserError(f"knockout layers {bad} are out of range: the model has {adapter.num_layers} layers")
    torch.manual_seed(options.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, rows, skipped, complete = [], [], Counter(), True
    try:
        records, first, generations = shard_questions(adapter, list(split.records(options.limit)), options.shard,
                                                         options.max_new_tokens)
        analyse_questions(adapter, records, options, first, generations, rows, skipped)
    except KeyboardInterrupt:
        complete = False  # the questions analysed so far are written below, marked complete: false
    header = {
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "model": str(adapter.name_or_path),
        "model_revision": adapter.revision,
        "dtype": dtype or str(adapter.dtype).replace("torch.", ""),
        "num_layers": adapter.num_layers,
        "data": str(split.data),
        "config": split.config,
        "split": split.split,
        "data_fingerprint": split.fingerprint,
        "data_files_sha256": split.files_sha256,
        "options": {
            "top_k": options.top_k, "draws": options.draws, "seed": options.seed, "n_layers": options.n_layers,
            "selection_fraction": options.selection_fraction, "limit": options.limit,
            "knockout_layers": None if options.knockout_layers is None else list(options.knockout_layers),
            "shard": options.shard, "max_new_tokens": options.max_new_tokens,
        },
        "versions": _versions(),
    }
    stats = summarize(rows, skipped, len(records), header, options)
    validate_stats(stats)
    write_examples(rows, out / EXAMPLES_FILE)
    if not complete:
        write_json_atomic(out / STATS_FILE, stats)
        raise interrupted(out / STATS_FILE)
    from harness.tracing.attention_plots import plot_constraint_to_last, plot_image_to_constraint

    title = f"{Path(str(adapter.name_or_path)).name} · {split.config}/{split.split}"
    plot_image_to_constraint(rows, out / "image_to_constraint.png", title)
    plot_constraint_to_last(stats, out / "constraint_to_last.png", title)
    write_json_atomic(out / STATS_FILE, stats)
    return stats

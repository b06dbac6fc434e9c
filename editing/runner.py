"""Run an editing experiment: requests -> edits -> metrics -> files.

For every method, requests are edited one at a time (weights restored in
between) or in batches of N (``batch_edits``), and each edit is scored before
and after. ``sweep_layers`` repeats the one-at-a-time run for every layer.

Writes into ``out``:
    edits.jsonl            one line per edit: request, pre/post predictions, metrics
    editing_results.json   averages with 95% bootstrap intervals, per method (schema shipped)
    comparison.md          the methods side by side
    efficacy_by_layer.png  with a layer sweep
Every file is written to a temporary name and renamed, so none is ever half-written.
The model's files on disk are never touched; ``save`` writes an edited copy elsewhere.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import datasets
import jsonschema
import numpy as np
import torch
import transformers

from editing import key_distinctness, metrics, report
from editing.answer_format import entity_prefix
from editing.key_stats import GenericCorpus
from editing.methods import BASELINES, MULTEDIT_VARIANTS, EditMethod, SkipEdit, make_method, weights_hash
from editing.methods.base import check_inputs, check_layers, request_prompts
from editing.requests import (
    TRACK_CONFIG,
    TRACKS,
    EditRequest,
    Skipped,
    build_requests,
    distinct_subject_batches,
    per_subject,
    request_from_record,
    shared_keys,
    with_augmented_views,
)
from harness.outputs import check_output_folder, interrupted, staged_folder
from harness.runs import dumps_line, write_json_atomic, write_lines_atomic
from harness.scoring import DEFAULT_MAX_NEW_TOKENS, answer_correct, as_prompt, generate_answers
from harness.tracing.causal_trace import TraceOptions, run_trace
from harness.tracing.stats import peak_mlp_layer
from harness.zoo.cache import cache_root
from vqa_constraints import __version__
from vqa_constraints.errors import UserError
from vqa_constraints.files import load_schema
from vqa_constraints.loading import load_split

log = logging.getLogger(__name__)

RESULTS_FORMAT_VERSION = 2
EDITS_FILE = "edits.jsonl"
RESULTS_FILE = "editing_results.json"
TABLE_FILE = "comparison.md"
PLOT_FILE = "efficacy_by_layer.png"
SPECIFICITY_CONFIG = "single_constraint"


@dataclass
class EditOptions:
    methods: list[str] = field(default_factory=lambda: ["multedit"])
    track: str = "insertion"
    layers: list[int] | None = None  # None: the tracer's peak layer (or the model's planted layer)
    # The visual constraint's last token (the paper's key); subject-token|last are named variants; auto: the most
    # distinct key on the validation split's requests (never the reported ones).
    key_position: str = "constraint"
    limit: int | None = None
    batch_edits: int = 1
    sweep_layers: bool | list[int] = False  # True: every layer; a list: those layers
    seed: int = 0
    split: str = "test"
    specificity_size: int = 32
    preserve_size: int = 0  # MultEdit: validation questions whose keys the edit must leave mapped as before
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 16
    trace_stats: str | None = None  # a finished trace whose peak MLP layer is the default layer
    trace_limit: int = 16  # questions traced to find the default layer when neither layers nor trace_stats is given
    method_options: dict = field(default_factory=dict)  # per method name: hyper-parameter overrides ("auto": tuned)
    method_config: str | None = None  # the YAML file method_options came from (recorded)
    key_stats_size: int = 64  # with covariance_source "questions": questions whose keys estimate C
    covariance_source: str = "corpus"  # corpus: the model's own sampled text; questions: validation questions
    corpus_keys: int = 20000  # keys of the generic corpus (N >> d)
    per_subject: int | None = 1  # edit requests per subject (None: all)
    distinct_batches: bool = True  # batches never hold two requests about one subject (where that can be arranged)
    neighbours: int = 8  # same-relation questions about other subjects, per edit (ROME's neighbourhood)
    validation_split: str = "validation"  # where every automatic choice is made
    validation_size: int = 12  # validation requests the choices are made on
    augment_views: int = 2  # augmented views of the image per request, where the record has no other views


# Hyper-parameters tuned on the validation split unless the method config fixes them, and their grids.
TUNED_BY_DEFAULT = {"ft-l": ("linf_rms",)}
GRIDS = {
    "linf_rms": (0.01, 0.03, 0.1, 0.3, 1.0),  # FT-L's bound, relative to the weight RMS
    "lam": (1e-3, 1e-2, 1e-1, 1.0),  # MultEdit's ridge, relative to the mean squared key norm
    "mom2_weight": (0.01, 0.1, 1.0, 10.0),  # MEMIT's covariance weight, per key dimension
}


# --- choosing the layer --------------------------------------------------------


def default_layers(adapter, data: str, out: Path, options: "EditOptions") -> tuple[list[int], str]:
    """(layers, where they came from): the peak causal MLP layer of a trace of this model.

    With ``options.trace_stats`` that trace is read; otherwise the tracer runs on
    the build's single-constraint questions (image-noise corruption, the first
    ``trace_limit`` questions) into ``out/trace``. A model config's
    ``planted_layer`` is the fallback when the trace finds no causal layer.
    """

    path = options.trace_stats
    if path:
        if not Path(path).exists():
            raise UserError(f"--trace-stats {path}: no such file")
        source = f"peak MLP layer of {path}"
    else:
        trace_out = Path(out) / "trace"
        run_trace(TraceOptions(model=str(adapter.name_or_path), data=str(data), config=SPECIFICITY_CONFIG,
                               out=trace_out, split=options.validation_split, corruption="image-noise",
                               limit=options.trace_limit, seed=options.seed, progress=False,
                               max_new_tokens=options.max_new_tokens), adapter)
        path = trace_out / "trace_stats.json"
        source = (f"peak MLP layer of a trace of {options.trace_limit} {SPECIFICITY_CONFIG}/{options.validation_split} "
                  "questions")
    try:
        # The visual constraint (or image) corrupted, restored at the last token; None when that group is null.
        layer = peak_mlp_layer(path, corrupted="visual", target="last")  # refuses a partial (interrupted) trace
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a trace_stats.json ({error})") from None
    if layer is not None:
        return [int(layer)], source
    planted = getattr(getattr(adapter.model, "config", None), "planted_layer", None)
    if planted is not None:
        return [int(planted)], "planted_layer in the model config (the trace found no causal MLP layer)"
    raise UserError(f"{path}: the trace found no causal MLP layer; pass --layers")


# --- requests ------------------------------------------------------------------


def make_requests(adapter, data: str, options: EditOptions, split_name: str | None = None,
                  limit: int | None = None) -> tuple[list[EditRequest], list[Skipped], dict]:
    """Edit requests for the track from ``split_name`` (default: the reported split), at most ``per_subject`` per
    subject and ``limit`` in all, the skipped records, and where they came from."""

    if options.track not in TRACKS:
        raise UserError(f"unknown track {options.track!r}; choose from {', '.join(TRACKS)}")
    split_name = split_name or options.split
    config = TRACK_CONFIG[options.track]
    split = load_split(data, config, split_name)
    records = list(split.records())
    wanted = limit if limit is not None else len(records)
    requests: list[EditRequest] = []
    skipped: list[Skipped] = []
    # Score records in chunks until enough requests are found (correction keeps only wrong answers).
    chunk = max(options.batch_size, 16)
    for start in range(0, len(records), chunk):
        if len(requests) >= wanted:
            break
        part = records[start : start + chunk]
        answers = generate_answers(adapter, part, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
        new, skip = build_requests(
            part, options.track, {r.id: a for r, a in zip(part, answers)},
            lambda answer, record: answer_correct(answer, record.answers),
        )
        requests = per_subject(requests + new, options.per_subject)
        skipped.extend(skip)
    requests = [with_augmented_views(with_prefix(adapter, r), options.augment_views, options.seed)
                for r in requests[:wanted]]
    source = {"data": str(data), "config": config, "split": split_name, "fingerprint": split.fingerprint,
              "files_sha256": split.files_sha256}
    return requests, skipped, source


def with_prefix(adapter, request: EditRequest) -> EditRequest:
    """The request with its answer prefix: the model's own answer up to its answer entity."""


    return replace(request, prefix=entity_prefix(adapter, request.question, request.image, request.current,
                                                  request.target))


def key_corpus(data: str, options: EditOptions, exclude: Sequence) -> tuple[list, str]:
    """Questions whose keys estimate MultEdit's key covariance with ``covariance_source="questions"``, and their
    fingerprint: a seeded sample of single-constraint validation questions."""
    excluded = {r.id for r in exclude}
    for split_name in (options.validation_split, "train"):
        try:
            split = load_split(data, SPECIFICITY_CONFIG, split_name)
        except UserError:
            continue
        chosen = seeded_records(split, options.seed + 2, lambda r: r.id not in excluded, options.key_stats_size)
        if chosen:
            return chosen, f"{split.fingerprint}:{SPECIFICITY_CONFIG}/{split_name}"
    raise UserError(f"{data}: no {SPECIFICITY_CONFIG} validation questions to estimate the key covariance from")


def seeded_records(split, seed: int, keep, limit: int | None) -> list:
    """Up to ``limit`` records that ``keep`` accepts, in an order shuffled by ``seed``."""
    indices = list(range(len(split)))
    random.Random(seed).shuffle(indices)
    chosen = []
    for index in indices:
        record = split.record(index)
        if keep(record):
            chosen.append(record)
        if limit is not None and len(chosen) == limit:
            break
    return chosen


def specificity_sample(data: str, options: EditOptions, split_name: str | None = None) -> list:
    """A fixed, seeded sample of questions whose answers an edit should leave alone."""
    split = load_split(data, SPECIFICITY_CONFIG, split_name or options.split)
    indices = list(range(len(split)))
    random.Random(options.seed).shuffle(indices)
    # A few spare so that dropping the edited subjects still leaves about ``specificity_size``.
    chosen = sorted(indices[: options.specificity_size + 8])
    return [split.record(i) for i in chosen]


def preservation_requests(data: str, options: EditOptions, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """A seeded sample of single-constraint *validation* questions (never the test questions that
    specificity is measured on), about subjects no request edits."""

    if options.preserve_size <= 0:
        return []
    try:
        split = load_split(data, SPECIFICITY_CONFIG, options.validation_split)
    except UserError:
        log.warning("%s has no %s/%s split: MultEdit runs without preserved keys", data, SPECIFICITY_CONFIG,
                    options.validation_split)
        return []
    subjects = {r.subject for r in requests}
    chosen = seeded_records(split, options.seed + 1, lambda r: r.subject not in subjects, options.preserve_size)
    return [request_from_record(record, "preserve") for record in chosen]


# --- what is measured around each edit ----------------------------------------------


@dataclass
class Context:
    """One split's requests and everything measured around them, read from the unedited model."""

    adapter: object
    options: EditOptions
    pre: dict  # request id -> metrics.Snapshot before any edit
    unrelated: list  # locality records (random single-constraint questions)
    unrelated_pre: list  # metrics.Unrelated before any edit
    neighbour_pool: dict = field(default_factory=dict)  # relation -> records of other subjects, seeded order
    neighbours: dict = field(default_factory=dict)  # record id -> metrics.Neighbour (pre-edit answer entity)
    same_subject: dict = field(default_factory=dict)  # request id -> records of its subject's other relations
    same_subject_pre: dict = field(default_factory=dict)  # record id -> pre-edit answer


def build_context(adapter, data: str, options: EditOptions, requests: Sequence[EditRequest],
                  split_name: str, batchings: Sequence[int]) -> Context:
    """Pre-edit answers for every question the edits of ``requests`` (grouped as ``batchings``) are scored on."""

    size = options.batch_size
    unrelated = specificity_sample(data, options, split_name)
    pre_answers = generate_answers(adapter, unrelated, max_new_tokens=options.max_new_tokens, batch_size=size)
    ctx = Context(adapter, options, {}, unrelated,
                  metrics.unrelated_state(adapter, unrelated, pre_answers, pre_answers, size))
    pools: list = []
    for config in dict.fromkeys((SPECIFICITY_CONFIG, TRACK_CONFIG[options.track])):
        pools.append(list(load_split(data, config, split_name).records()))
    shuffled = [r for pool in pools for r in pool]
    random.Random(options.seed + 3).shuffle(shuffled)
    for record in shuffled:
        ctx.neighbour_pool.setdefault(record.relation, []).append(record)
    # Neighbours: the first of the relation's pool about no subject of the edit's batch, for every planned batching.
    wanted = {}
    for size_ in batchings:
        for group in plan_batches(requests, size_, options):
            for request in group:
                for record in neighbours_for(ctx, request, group):
                    wanted[record.id] = record
    records = list(wanted.values())
    answers = generate_answers(adapter, records, max_new_tokens=options.max_new_tokens, batch_size=size)
    for record, answer in zip(records, answers):
        prompt = as_prompt(record, adapter)
        prefix = entity_prefix(adapter, prompt.question, prompt.image, answer, record.answers[0]) if answer else ""
        ctx.neighbours[record.id] = metrics.Neighbour(record, prompt, answer, prefix,
                                                      metrics.old_entity(answer, prefix))
    same = {}
    by_subject: dict[str, dict] = {}
    for pool in pools:
        for record in pool:
            by_subject.setdefault(record.subject, {})[record.id] = record
    for request in requests:
        chosen = [r for r in by_subject.get(request.subject, {}).values()
                  if r.relation != request.relation and r.id != request.id]
        ctx.same_subject[request.id] = chosen
        same.update({r.id: r for r in chosen})
    same_records = list(same.values())
    answers = generate_answers(adapter, same_records, max_new_tokens=options.max_new_tokens, batch_size=size)
    ctx.same_subject_pre = {r.id: a for r, a in zip(same_records, answers)}
    for request in requests:
        ctx.pre[request.id] = metrics.snapshot(adapter, request, options.max_new_tokens, size)
    return ctx


def neighbours_for(ctx: Context, request: EditRequest, group: Sequence[EditRequest]) -> list:
    subjects = {r.subject for r in group}
    pool = ctx.neighbour_pool.get(request.relation, [])
    return [r for r in pool if r.subject not in subjects][: ctx.options.neighbours]


def plan_batches(requests: Sequence[EditRequest], batch: int, options: EditOptions) -> list[list[EditRequest]]:
    if batch > 1 and options.distinct_batches:
        return distinct_subject_batches(requests, batch)
    return [list(requests[i : i + batch]) for i in range(0, len(requests), batch)]


def _unrelated_for(ctx: Context, requests: Sequence[EditRequest]):
    subjects = {r.subject for r in requests}
    pairs = [(rec, pre) for rec, pre in zip(ctx.unrelated, ctx.unrelated_pre) if rec.subject not in subjects]
    return pairs[: ctx.options.specificity_size]


# --- running one method ----------------------------------------------------------


def run_method(ctx: Context, method: EditMethod, requests: Sequence[EditRequest], layers: Sequence[int],
               batch: int, lines: list[str] | None, sweep: bool = False) -> tuple[dict, list[dict]]:
    """Edit ``requests`` in groups of ``batch`` with ``method`` at ``layers``; per-edit rows into ``lines``.
    Returns the summary and the per-edit metric rows (with id and subject)."""

    adapter, options = ctx.adapter, ctx.options
    edited = check_layers(adapter, layers)
    before = weights_hash(*edited)  # only what an edit may touch: hashing a whole 7B model per method is minutes
    rows, skipped, times, infos, shared = [], [], [], [], []
    key_position = getattr(method, "key_position", "last")
    metrics.reset_peak_memory(adapter.device)
    for group in plan_batches(requests, batch, options):
        pairs_sharing = shared_keys(group, key_position) if len(group) > 1 else []
        if pairs_sharing:
            shared.extend(pairs_sharing)
            log.warning("%s: %d pair(s) of requests in one batch share a key at %s (e.g. %s and %s): the solve "
                        "writes the mean of their targets", method.name, len(pairs_sharing), key_position,
                        *pairs_sharing[0])
        try:
            began = time.perf_counter()
            handle = method.apply(adapter, group, layers)
            elapsed = time.perf_counter() - began
        except SkipEdit as error:
            skipped.extend({"id": r.id, "reason": str(error)} for r in group)
            continue
        try:
            times.append(elapsed / len(group))
            infos.append(handle.info)
            pairs = _unrelated_for(ctx, group)
            records, pre_states = [rec for rec, _ in pairs], [state for _, state in pairs]
            post_answers = generate_answers(adapter, records, max_new_tokens=options.max_new_tokens,
                                            batch_size=options.batch_size)
            post_states = metrics.unrelated_state(adapter, records, post_answers, [s.answer for s in pre_states],
                                                  options.batch_size)
            local = metrics.locality_measures(records, pre_states, post_states)
            unrelated = [{"id": rec.id, "before": a.answer, "after": b.answer}
                         for rec, a, b in zip(records, pre_states, post_states)]
            same_records = [r for request in group for r in ctx.same_subject[request.id]]
            same_after = dict(zip([r.id for r in same_records], generate_answers(
                adapter, same_records, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)))
            for request in group:
                post = metrics.snapshot(adapter, request, options.max_new_tokens, options.batch_size)
                row = metrics.edit_metrics(request, ctx.pre[request.id], post)
                neighbours = [ctx.neighbours[r.id] for r in neighbours_for(ctx, request, group)]
                row["neighborhood"], row["neighborhood_magnitude"] = metrics.neighbour_scores(
                    adapter, neighbours, request.target, options.batch_size)
                same = [(r, ctx.same_subject_pre[r.id], same_after[r.id]) for r in ctx.same_subject[request.id]]
                row["same_subject"] = metrics._mean([metrics.entity_unchanged(r, a, b) for r, a, b in same])
                row["specificity"] = metrics.specificity_of(row)
                row.update(local)
                rows.append({"id": request.id, "subject": request.subject, **row})
                if lines is None:
                    continue
                lines.append(dumps_line({
                    "method": method.name,
                    "layers": [int(l) for l in layers],
                    "batch": [r.id for r in group] if batch > 1 else None,
                    "sweep": sweep,
                    "request": request.describe(),
                    "pre": ctx.pre[request.id].as_dict(),
                    "post": post.as_dict(),
                    "metrics": {k: (None if v is None else round(float(v), 6)) for k, v in row.items()},
                    "info": _jsonable(handle.info),
                    "neighbours": [{"id": n.record.id, "answer": n.answer, "entity": n.entity} for n in neighbours],
                    "same_subject": [{"id": r.id, "before": a, "after": b} for r, a, b in same],
                    "unrelated": unrelated,
                }))
        finally:
            handle.restore()
    if weights_hash(*check_layers(adapter, layers)) != before:  # never expected: restore() puts the originals back
        raise RuntimeError(f"{method.name}: weights differ from the original after restoring")
    memory, memory_kind = metrics.peak_memory_mb(adapter.device)
    summary = metrics.summarise_rows(rows, options.seed, method.name)
    summary.update({
        "edits": len(rows),
        "subjects": len({r["subject"] for r in rows}),
        "skipped": len(skipped),
        "skip_reasons": skipped,
        "shared_key_pairs": [list(p) for p in shared],
        "seconds_per_edit": round(float(np.mean(times)), 4) if times else None,
        "peak_memory_mb": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "layers": [int(l) for l in layers],
        "batch_edits": batch,
        "key_position": key_position,
        "config": _jsonable(method.config()),
    })
    bounds = [info["linf"] for info in infos if "linf" in info]
    if bounds:
        active = [bool(info.get("bound_active")) for info in infos]
        # Counted per edit operation: one per request, or one per batch when requests are edited together.
        summary["linf_bound"] = {"linf": float(bounds[0]), "linf_rms": getattr(method, "linf_rms", None),
                                 "edits_where_active": int(sum(active)), "edit_operations": len(active),
                                 "never_bound": not any(active)}
    if infos and "seconds" in infos[0]:
        # Per edit: where MultEdit's time goes (keys, delta optimisation, closed-form solve).
        summary["seconds_breakdown"] = {k: round(sum(i["seconds"][k] for i in infos) / max(1, len(rows)), 4)
                                        for k in infos[0]["seconds"]}
    if infos and "delta_forward" in infos[0]:
        # MultEdit: how its delta steps ran (prefix-cached, or full forwards where the cache was not exact).
        summary["delta_forward"] = sorted({kind for info in infos for kind in info["delta_forward"]})
    return summary, rows


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: float(v) if hasattr(v, "__float__") else str(v)))


# --- choices made on the validation split ---------------------------------------------


def usable_requests(adapter, requests, methods, layers) -> tuple[list[EditRequest], list[dict]]:
    """Drop requests some method cannot even build inputs for (counted), so a batch never fails for one."""
    check_inputs(adapter, requests, layers)
    keep, skipped = [], []
    for request in requests:
        try:
            for method in methods:
                request_prompts(adapter, request, getattr(method, "key_position", "last"))
            keep.append(request)
        except SkipEdit as error:
            skipped.append({"id": request.id, "reason": str(error)})
    return keep, skipped


@dataclass
class Validation:
    """The validation split's requests and questions: every automatic choice is made on these alone."""

    requests: list
    unrelated: list
    source: dict


def validation_data(adapter, data: str, options: EditOptions) -> Validation | None:
    """Requests (at most ``validation_size``) and locality questions from the validation split; None without one."""
    options = validation_options(options)
    try:
        requests, _, source = make_requests(adapter, data, options, options.validation_split, options.validation_size)
        unrelated = specificity_sample(data, options, options.validation_split)
    except UserError as error:
        log.warning("no validation split to choose settings on (%s)", error)
        return None
    if not requests:
        return None
    return Validation(requests, unrelated, source)


def validation_options(options: EditOptions) -> EditOptions:
    """The options validation runs use: sizes from ``validation_size`` only, so nothing about the reported run
    (its limit, specificity sample, batches or sweep) reaches a choice."""

    return replace(options, specificity_size=2 * options.validation_size, limit=None, batch_edits=1,
                   sweep_layers=False)


def tuned_parameters(options: EditOptions) -> dict[str, list[str]]:
    """Per method: the hyper-parameters to tune on validation ("auto" in the method config, or tuned by default
    unless the config fixes them)."""
    out = {}
    for name in options.methods:
        given = options.method_options.get(name, {})
        params = [p for p, v in given.items() if v == "auto"]
        params += [p for p in TUNED_BY_DEFAULT.get(name, ()) if p not in given]
        if params:
            out[name] = params
    return out


def choose_settings(adapter, data: str, options: EditOptions, layers: Sequence[int],
                    validation: Validation | None) -> dict:
    """The key position (``auto``) and tuned hyper-parameters, chosen on ``validation`` alone; the record of how.

    Nothing here sees the reported split: the function is given the validation split's requests and questions
    only (tests/test_editing_validation.py changes the reported requests and checks the choice stays put).
    """

    options = validation_options(options)
    record: dict = {"split": options.validation_split, "requests": 0, "key_position": None, "parameters": {}}
    position, why = options.key_position, "--key-position"
    tune = tuned_parameters(options)
    if validation is None:
        if options.key_position == "auto":
            raise UserError(f"--key-position auto needs a {options.validation_split} split to choose on")
        if tune:
            raise UserError(f"{', '.join(tune)}: tuning needs a {options.validation_split} split "
                            "(or fix the values in --method-config)")
        return {**record, "key_position": {"chosen": position, "source": why}}
    record["requests"] = len(validation.requests)
    record["subjects"] = len({r.subject for r in validation.requests})
    record["data"] = validation.source
    all_layers = list(range(adapter.num_layers))
    edited = key_distinctness.question_keys(
        adapter, [(r.question, r.image, r.key_span) for r in validation.requests], all_layers)
    prompts = [(as_prompt(r, adapter), r) for r in validation.unrelated[: options.specificity_size]]
    others = key_distinctness.question_keys(
        adapter, [(p.question, p.image, _constraint_span(r) if p.question == r.question else None) for p, r in prompts],
        all_layers)
    table = key_distinctness.table(edited, others, all_layers)
    if options.key_position == "auto":
        chosen, spills = key_distinctness.most_distinct_position(table, layers[0])
        if chosen is None:
            position, why = "last", "no key position could be read; the last prompt token"
        else:
            position = chosen
            why = (f"least predicted spill at layer {layers[0]} on the {options.validation_split} split ("
                   + ", ".join(f"{p} {v:.3f}" for p, v in spills.items()) + ")")
    record["key_position"] = {"chosen": position, "source": why}
    record["key_distinctness"] = table
    if tune:
        ctx = build_context(adapter, data, options, validation.requests, options.validation_split, [1])
        for name, params in tune.items():
            for param in params:
                if param not in GRIDS:
                    raise UserError(f"--method-config: {name}.{param}: 'auto' is not supported for {param} "
                                    f"(tunable: {', '.join(GRIDS)})")
                fixed = {k: v for k, v in options.method_options.get(name, {}).items() if v != "auto"}
                grid = {}
                for value in GRIDS[param]:
                    method = make_method(name, key_position=position, **{**fixed, param: value})
                    prepare_method(adapter, data, options, method, layers)
                    summary, _ = run_method(ctx, method, validation.requests, layers, 1, None)
                    grid[str(value)] = {k: summary[k] for k in ("score", "efficacy_score", "specificity")}
                # The best validation score; ties go to the first grid value (the tighter bound / smaller change).
                best = max(GRIDS[param], key=lambda v: (grid[str(v)]["score"] or 0.0, -GRIDS[param].index(v)))
                record["parameters"].setdefault(name, {})[param] = {
                    "chosen": best, "rule": "highest harmonic-mean score on the validation requests, one at a time",
                    "grid": grid}
    return record


def _constraint_span(record) -> tuple[int, int] | None:
    visual = record.visual_constraints
    return (visual[-1].char_start, visual[-1].char_end) if visual else None


def prepare_method(adapter, data: str, options: EditOptions, method, layers) -> dict | None:
    """Give a covariance-using method its key corpus; returns what C is estimated from (None for other methods)."""
    if getattr(method, "form", "lambda") == "lambda":
        return None
    if options.covariance_source == "corpus":
        method.generic_corpus(GenericCorpus(n_keys=options.corpus_keys, seed=options.seed))
        source = {"source": "corpus", "corpus": "the model's own sampled text (editing/key_stats.py GenericCorpus)"}
    else:
        corpus, fingerprint = key_corpus(data, options, [])
        method.key_corpus(corpus, fingerprint)
        source = {"source": "questions", "questions": len(corpus), "fingerprint": fingerprint}
    covs = {int(l): method.covariance(adapter, int(l)) for l in layers}
    return {**source, "layers": {str(l): c.describe() for l, c in covs.items()}}


def sweep_layer_list(sweep_layers: bool | list[int], num_layers: int) -> list[int]:
    return list(range(num_layers)) if sweep_layers is True else list(sweep_layers)


# --- the whole experiment ---------------------------------------------------------


def run_editing(adapter, data: str, out: str | Path, options: EditOptions, save: str | Path | None = None,
                overwrite: bool = False) -> dict:
    """The whole experiment; returns the results document (also written to ``out``).

    ``save``: also write the edited model there (see ``save_edited``; ``overwrite`` as there).
    An interrupt (Ctrl-C) writes the methods finished so far with ``complete: false`` and re-raises.
    """

    out = Path(out)
    if options.batch_edits < 1:
        raise UserError(f"--batch-edits must be at least 1, got {options.batch_edits}")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit must be at least 1, got {options.limit}")
    if options.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
    if options.key_stats_size < 1:
        raise UserError(f"--key-stats-size must be at least 1, got {options.key_stats_size}")
    if options.covariance_source not in ("corpus", "questions"):
        raise UserError(f"--covariance-source must be corpus or questions, got {options.covariance_source!r}")
    if save is not None:
        check_save_target(adapter.name_or_path, save, overwrite)  # before hours of editing, not after
    _seed(options.seed)
    if options.layers:
        layers, layer_source = list(options.layers), "--layers"
    else:
        layers, layer_source = default_layers(adapter, data, out, options)
    check_layers(adapter, layers)
    if options.sweep_layers:
        check_layers(adapter, sweep_layer_list(options.sweep_layers, adapter.num_layers))

    # Every automatic choice first, on the validation split alone.
    validation = validation_data(adapter, data, options)
    choices = choose_settings(adapter, data, options, layers, validation)
    key_position = choices["key_position"]["chosen"]
    tuned = {name: {p: v["chosen"] for p, v in params.items()} for name, params in choices["parameters"].items()}

    requests, skipped_records, source = make_requests(adapter, data, options, options.split, options.limit)
    if not requests:
        raise UserError(
            f"{data}: no edit requests for track {options.track!r} "
            f"({len(skipped_records)} records skipped: the model already answers them)"
        )
    methods = []
    for name in options.methods:
        given = {k: v for k, v in options.method_options.get(name, {}).items() if v != "auto"}
        methods.append(make_method(name, key_position=key_position, **{**given, **tuned.get(name, {})}))
    requests, skipped_requests = usable_requests(adapter, requests, methods, layers)
    if not requests:
        raise UserError(f"{data}: every request was skipped: {skipped_requests[0]['reason']}")
    log.info("%d edit requests (%d records skipped), layers %s from %s, key position %s (%s)", len(requests),
             len(skipped_records), layers, layer_source, key_position, choices["key_position"]["source"])

    preserved = preservation_requests(data, options, requests)
    key_stats = None
    for method in methods:
        if hasattr(method, "preserve"):
            method.preserve(preserved)
        described = prepare_method(adapter, data, options, method, layers)
        key_stats = key_stats or described

    batchings = sorted({options.batch_edits, 1} if options.sweep_layers else {options.batch_edits})
    ctx = build_context(adapter, data, options, requests, options.split, batchings)

    lines: list[str] = []
    results: dict[str, dict] = {}  # only methods that finished: a partial document lists fewer
    rows: dict[str, list] = {}
    sweep: dict[str, list] = {}
    complete = False
    try:
        for method in methods:
            log.info("%s: %d edits at layers %s", method.name, len(requests), layers)
            results[method.name], rows[method.name] = run_method(ctx, method, requests, layers, options.batch_edits,
                                                                 lines)
        if options.sweep_layers:
            for method in methods:
                sweep[method.name] = []
                for layer in sweep_layer_list(options.sweep_layers, adapter.num_layers):
                    log.info("sweep %s: layer %d", method.name, layer)
                    summary, _ = run_method(ctx, method, requests, [layer], 1, lines, sweep=True)
                    sweep[method.name].append({"layer": layer, **{k: summary[k] for k in (
                        "efficacy", "efficacy_score", "generalization", "specificity", "neighborhood",
                        "same_subject", "logprob_gain", "score", "seconds_per_edit", "edits")}})
        complete = True
    except KeyboardInterrupt:
        pass  # the edits finished so far are written below, marked complete: false

    comparisons = [metrics.paired_comparison(rows[a], rows[b], options.seed, a, b)
                   for a in MULTEDIT_VARIANTS if a in rows for b in BASELINES if b in rows]
    document = {
        "format_version": RESULTS_FORMAT_VERSION,
        "complete": complete,
        "model": {"name_or_path": str(adapter.name_or_path), "revision": adapter.revision,
                  "family": adapter.family, "dtype": str(adapter.dtype).replace("torch.", ""),
                  "device": adapter.device.type, "num_layers": adapter.num_layers},
        "data": source,
        "options": _jsonable(asdict(options)),
        "layers": [int(l) for l in layers],
        "layer_source": layer_source,
        "key_position": key_position,
        "key_position_source": choices["key_position"]["source"],
        "choices": choices,
        "key_statistics": key_stats,
        "requests": len(requests),
        "subjects": len({r.subject for r in requests}),
        "skipped": {"records": len(skipped_records), "requests": len(skipped_requests),
                    "reasons": _count_reasons([s.reason for s in skipped_records] +
                                              [s["reason"] for s in skipped_requests])},
        "specificity_questions": len(ctx.unrelated),
        "neighbour_questions": len(ctx.neighbours),
        "same_subject_questions": len(ctx.same_subject_pre),
        "preserved_questions": len(preserved),
        "methods": results,
        "comparisons": comparisons,
        "sweep": sweep,
        "versions": _versions(),
    }
    validate_results(document)
    out.mkdir(parents=True, exist_ok=True)
    write_lines_atomic(out / EDITS_FILE, lines)
    write_json_atomic(out / RESULTS_FILE, document)
    if not complete:
        raise interrupted(out / RESULTS_FILE)
    report.write_table(document, out / TABLE_FILE)
    if sweep:
        report.write_sweep_plot(document, out / PLOT_FILE)
    if save is not None:
        save_edited(adapter, methods[0], requests, layers, save, overwrite=overwrite)
    return document


def edit_rows(folder: str | Path, method: str) -> list[dict]:
    """The per-edit metric rows (id, subject and metrics, as ``run_method`` returns them) of one method in a run's
    edits.jsonl, layer-sweep lines left out."""
    rows = []
    with open(Path(folder) / EDITS_FILE, encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            if entry["method"] == method and not entry.get("sweep"):
                rows.append({"id": entry["request"]["id"], "subject": entry["request"]["subject"],
                             **entry["metrics"]})
    return rows


def results_schema() -> dict:
    return load_schema("editing", "schemas", "editing_results.schema.json")


def validate_results(document: dict) -> None:
    """Check a results document against the shipped schema (a failure here is a bug, not bad input)."""

    jsonschema.validate(document, results_schema())


def save_edited(adapter, method: EditMethod, requests, layers, target: str | Path, overwrite: bool = False) -> Path:
    """Apply all requests at once with ``method`` and save the edited model to ``target``.

    Written into a temporary sibling, marked as `edit --save` output and renamed into place. ``target``
    may be new, empty or an earlier `edit --save` output; any other folder needs ``overwrite``, and the
    model's own folder (or one holding it), the working directory and the home folder are always refused.
    """
    target = check_save_target(adapter.name_or_path, target, overwrite)
    with staged_folder(target, SAVE_COMMAND) as staging:
        handle = method.apply(adapter, requests, layers)
        try:
            adapter.model.save_pretrained(staging, safe_serialization=True)
            if adapter.processor is not None:
                adapter.processor.save_pretrained(staging)
            elif adapter.tokenizer is not None:
                adapter.tokenizer.save_pretrained(staging)
        finally:
            handle.restore()
    return target


SAVE_COMMAND = "vqa-constraints edit --save"


def check_save_target(model: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    """``target`` checked as ``--save`` for the model at ``model`` (a folder, or a Hub id with no folder to protect)."""

    source = Path(str(model))
    protected = [(source, "the model's own folder")] if source.exists() else []
    # The cache holds every zoo model and key statistics: an edited model saved over it would delete them.
    protected.append((cache_root(), "the vqa-constraints cache"))
    return check_output_folder(target, "--save", SAVE_COMMAND, overwrite, protected)


def _count_reasons(reasons: list[str]) -> dict:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict:
    return {"vqa_constraints": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "python": platform.python_version()}

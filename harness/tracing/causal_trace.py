"""MultimodalCausalTrace (Basu et al., 2024), read top to bottom like the paper.

For one question the model answers correctly:
1. clean run      record every layer's residual output, MLP output and
                  attention output at every position, and p_clean, the
                  probability of the traced target (``targets.py``: by
                  default the gold answer's tokens after the model's own
                  words, "The capital of France is" -> " Paris");
2. corrupted run  corrupt the constraint (``replace`` its tokens by one fixed
                  token, or add Gaussian ``noise`` to their embeddings) or the
                  image itself (``image-noise`` on the projected features):
                  p_corrupt;
3. restored runs  copy one clean activation (kind hidden/mlp/attn, a window of
                  w layers around layer l, at the positions of interest) back
                  into the corrupted run: p_restored, indirect effect
                  p_restored - p_corrupt, normalised by p_clean - p_corrupt.

Steps 2-3 are run by an engine (``engine_reference``: one full forward per
restoration; ``engine_fast``: shared prefix cache and batched suffixes).
``run_trace`` sweeps a dataset split and writes statistics, parquet and plots.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import vqa_constraints
from harness.hooks import record_outputs
from harness.models.base import Encoded, ModelAdapter
from harness.models.loading import load_model
from harness.outputs import interrupted
from harness.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, answer_correct, generate_answers
from harness.shards import aligned_window, parse_shard
from harness.tracing import plots, stats
from harness.tracing.corruptions import (  # noqa: F401 (names the tests and the CLI read from here)
    CORRUPTIONS,
    DEFAULT_REPLACE_TOKEN,
    NOISE_SCALE,
    corruption_kind,
    embedding_std,
    replacement_token,
)
from harness.tracing.engine_fast import FastEngine
from harness.tracing.engine_reference import ReferenceEngine
from harness.tracing.options import (  # noqa: F401 (the names callers import from here)
    ANSWER_SCORES,
    ENGINE_NAMES,
    POSITIONS,
    PREFIX_SUBJECT,
    TRACED,
    TraceOptions,
    parse_window,
    windows_by_kind,
)
from harness.tracing.patching import (
    KINDS,
    Corruption,
    Prepared,
    RestoreSet,
    answer_probability,
    module_for,
    recording_language_model_inputs,
)
from harness.tracing.targets import SOURCES, choose_target
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split

log = logging.getLogger(__name__)

ENGINES = dict(zip(ENGINE_NAMES, (FastEngine, ReferenceEngine)))


# --- 1. clean run -------------------------------------------------------------


def clean_run(
    adapter: ModelAdapter, encoded: Encoded
) -> tuple[dict, torch.Tensor, torch.Tensor | None, list[int], list[int], float]:
    """Clean activations (kind -> per-layer [T, H]), the language model's input embeddings [1, T, H] and
    position ids (None when the model lets its language model count them), the answer tokens, the
    positions predicting them, and p_clean.

    Without an answer in ``encoded`` the answer is the model's own top next token;
    with one (``encode(..., answer=...)``) it is every answer token, teacher forced.
    """
    names = {f"{kind}.{layer}": module_for(adapter, kind, layer) for kind in KINDS for layer in range(adapter.num_layers)}
    with torch.no_grad(), record_outputs(names) as seen, recording_language_model_inputs(adapter) as lm_inputs:
        logits = adapter.model(**encoded.inputs).logits
    answer_positions = list(getattr(encoded, "answer_positions", None) or [])
    if answer_positions:
        tokens = [int(encoded.input_ids[0, q]) for q in answer_positions]
        score_positions = [q - 1 for q in answer_positions]
    else:
        score_positions = [encoded.last_position]
        tokens = [int(logits[0, -1].argmax())]
    p_clean = float(answer_probability(logits[:, score_positions], tokens)[0])
    clean = {kind: [seen[f"{kind}.{layer}"][0] for layer in range(adapter.num_layers)] for kind in KINDS}
    return clean, lm_inputs["inputs_embeds"], lm_inputs["position_ids"], tokens, score_positions, p_clean


# --- 2. corrupted run ---------------------------------------------------------


def make_corruption(
    adapter: ModelAdapter,
    mode: str,
    constraint_positions: list[int],
    encoded: Encoded,
    clean_embeds: torch.Tensor,
    seed: int,
    samples: int,
    replace_token: str = DEFAULT_REPLACE_TOKEN,
    bridge_positions: list[int] = (),
) -> Corruption:
    """The corruption ``mode`` (a name in ``CORRUPTIONS``, corruptions.py) of one example, applied to the language
    model's input embeddings ``clean_embeds``; noise is drawn from a generator seeded per example.

    ``bridge_positions`` (the forced prefix's tokens naming the subject, ``targets.py``) are corrupted as
    text in every mode: replaced by the same token under ``replace``, Gaussian noise of the token-embedding
    scale otherwise (also under ``image-noise``, whose own scale is the image features')."""
    generator = torch.Generator().manual_seed(seed)
    kind = corruption_kind(mode)
    bridge_positions = [q for q in bridge_positions if q not in constraint_positions]
    return kind.corrupt(adapter, encoded, clean_embeds, list(constraint_positions), bridge_positions, generator,
                        samples, replace_token)


def prepare(
    adapter: ModelAdapter,
    encoded: Encoded,
    engine,
    mode: str,
    constraint_positions: list[int],
    seed: int = 0,
    samples: int = 5,
    replace_token: str = DEFAULT_REPLACE_TOKEN,
    bridge_positions: list[int] = (),
) -> Prepared:
    """Clean run + corrupted run of one example: everything restored runs need."""
    clean, embeds, position_ids, tokens, score_positions, p_clean = clean_run(adapter, encoded)
    corruption = make_corruption(adapter, mode, constraint_positions, encoded, embeds, seed, samples, replace_token,
                                 bridge_positions)
    prepared = Prepared(adapter, encoded.inputs, embeds, corruption, clean, tokens, score_positions, p_clean,
                        position_ids=position_ids)
    engine.prepare(prepared)
    return prepared


# --- 3. restored runs ---------------------------------------------------------


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """The ``window`` consecutive layers centred on ``layer``, clipped to the model."""
    start = max(0, layer - window // 2)
    return range(start, min(num_layers, layer - window // 2 + window))


def restore_set(kind: str, layer: int, positions: list[int], window: int, num_layers: int) -> RestoreSet:
    return frozenset((kind, j, q) for j in window_layers(layer, window, num_layers) for q in positions)


def trace_example(
    prepared: Prepared, engine, targets: dict[str, list[int]], kinds: list[str], window: int | dict[str, int],
    progress=None
) -> dict[str, np.ndarray]:
    """p_restored for each target (a named set of positions): name -> [len(kinds), layers]; ``window``: one
    for every kind, or kind -> window."""
    layers = prepared.num_layers
    windows = window if isinstance(window, dict) else {kind: window for kind in kinds}
    sets = [
        restore_set(kind, layer, positions, windows[kind], layers)
        for positions in targets.values()
        for kind in kinds
        for layer in range(layers)
    ]
    probs = engine.score(prepared, sets, progress=progress)
    shaped = probs.reshape(len(targets), len(kinds), layers)
    return {name: shaped[i] for i, name in enumerate(targets)}


def indirect_effects(p_restored: np.ndarray, p_clean: float, p_corrupt: float) -> tuple[np.ndarray, np.ndarray]:
    """(p_restored - p_corrupt, the same divided by p_clean - p_corrupt; NaN where the corruption did nothing)."""
    effect = p_restored - p_corrupt
    gap = p_clean - p_corrupt
    normalised = effect / gap if abs(gap) > 1e-12 else np.full_like(effect, np.nan)
    return effect, normalised


def make_engine(name: str, **kwargs):
    if name not in ENGINES:
        raise UserError(f"--engine {name!r}: choose from {', '.join(ENGINES)}")
    return ENGINES[name](**kwargs) if name == "fast" else ENGINES[name]()


# --- a whole split -------------------------------------------------------------


class ConstraintNotFound(UserError):
    """A constraint of one question maps to no token of its prompt: that question is skipped and counted."""


@dataclass
class Skips:
    """Questions not traced, by reason (reported in trace_stats.json)."""

    wrong_answer: int = 0
    constraint_not_found: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if len(self.messages) < 20:
            self.messages.append(message)


def locate_constraints(record, encoded: Encoded, text_only: bool) -> list[tuple[str, list[int]]]:
    """(type, token positions) of each constraint in the prompt actually traced.

    With ``--text-only`` the visual constraint is the subject's name inside
    ``text_only_question``; textual constraints are found there by their text.
    """
    located = []
    for constraint in record.constraints:
        if not text_only:
            located.append((constraint.type, encoded.positions_for_question_span(constraint.char_start, constraint.char_end)))
            continue
        needle = record.subject if constraint.type == "visual" else constraint.text
        start = record.text_only_question.lower().find(needle.lower())
        if start < 0:
            raise UserError(f"{constraint.type} constraint {needle!r} does not occur in text_only_question")
        located.append((constraint.type, encoded.positions_for_question_span(start, start + len(needle))))
    return located


def example_seed(seed: int, record_id: str, unit: int) -> int:
    return zlib.crc32(f"{seed}:{record_id}:{unit}".encode())


def trace_targets(located, encoded: Encoded, positions: str, last: int | None = None,
                  predicting: int | None = None, bridges: list[int] = ()) -> list[tuple[str, int, list[int]]]:
    """(target kind, index, positions) restored as one unit: each constraint's tokens together, each
    constraint's last token alone (ROME's key token), the prompt's last token, the token that predicts the
    target when a forced prefix puts it elsewhere, the prefix's tokens naming the subject (``bridges``,
    together and their last), and with ``all`` every text position of the prompt on its own."""
    last = encoded.last_position if last is None else last  # the prompt's last token, also under a forced answer
    targets = []
    if positions in ("constraint", "all"):
        targets += [(f"{kind} constraint", i, pos) for i, (kind, pos) in enumerate(located)]
        targets += [(f"{kind} constraint (last token)", i, pos[-1:]) for i, (kind, pos) in enumerate(located)]
    targets.append(("last token", 0, [last]))
    if predicting is not None and predicting != last:
        targets.append(("predicting token", 0, [predicting]))
    if bridges and positions in ("constraint", "all"):
        targets += [("prefix subject", 0, list(bridges)), ("prefix subject (last token)", 0, [bridges[-1]])]
    if positions == "all":
        text = [q for q, (a, b) in enumerate(encoded.token_char_spans[:last]) if a >= 0]
        targets += [("position", q, [q]) for q in text]
    return targets


def bridge_entities(record) -> list[str]:
    """The entities a question reaches its answer through: its subject, and what its visual constraints refer to."""
    named = [record.subject] + [c.entity for c in record.constraints if c.type == "visual"]
    return [entity for i, entity in enumerate(named) if entity and entity not in named[:i]]


def trace_record(adapter, record, engine, options: TraceOptions, bar=None, prediction: str | None = None) -> list[dict]:
    """All trace rows of one record (``prediction``: the model's greedy answer, where the target is found,
    see ``targets.py``); each row names the engine that computed it and describes the target."""

    question = record.text_only_question if options.text_only else record.question
    image = None if options.text_only else record.image
    golds = [record.subject] if options.target == "subject" else record.answers
    chosen = choose_target(adapter, question, image, golds, prediction, options.target, options.answer,
                           bridges=bridge_entities(record))
    encoded = chosen.encoded  # answer_positions: the target's tokens only
    try:
        located = locate_constraints(record, encoded, options.text_only)
    except UserError as error:
        raise ConstraintNotFound(str(error)) from None
    corruption = CORRUPTIONS[options.corruption]  # (`kind` below is the restored kind: hidden, mlp, attn)
    if corruption.corrupts_image:
        units = [("image", 0, [])]
    else:
        units = [(f"{kind} constraint", i, pos) for i, (kind, pos) in enumerate(located)]
    # The subject named in the forced prefix is corrupted with every unit: otherwise the corrupted run reads
    # the answer off the model's own words (targets.py).
    bridges = list(chosen.bridge_positions) if options.prefix_subject == "corrupt" else []
    predicting = chosen.predicting_position if chosen.encoded.answer_positions else None
    targets = trace_targets(located, encoded, options.positions, last=chosen.prompt_last, predicting=predicting,
                            bridges=list(chosen.bridge_positions))
    windows = windows_by_kind(options.window, adapter.num_layers)
    rows = []
    for corrupted, corrupted_index, corrupt_positions in units:
        prepared = prepare(
            adapter, encoded, engine, options.corruption, corrupt_positions,
            seed=example_seed(options.seed, record.id, corrupted_index),
            samples=options.noise_samples if corruption.random else 1,
            replace_token=options.replace_token, bridge_positions=bridges,
        )
        if bar is not None:
            bar.total += len(targets) * len(options.kinds) * prepared.num_layers
            bar.refresh()
        named = {f"{t}#{i}": pos for t, i, pos in targets}
        restored = trace_example(prepared, engine, named, list(options.kinds), windows,
                                 progress=bar.update if bar is not None else None)
        corrupted_all = set(bridges) if corruption.corrupts_image else set(prepared.corruption.positions)
        for (target, index, pos), p in zip(targets, restored.values()):
            for k, kind in enumerate(options.kinds):
                effect, normalised = indirect_effects(p[k], prepared.p_clean, prepared.p_corrupt)
                rows.append({
                    "id": record.id, "config": record.config, "num_constraints": len(record.constraints),
                    "corrupted": corrupted, "corrupted_index": corrupted_index,
                    "target": target, "target_index": index, "target_positions": list(pos),
                    "target_text": "".join(encoded.text[a:b] for a, b in (encoded.token_char_spans[q] for q in pos) if a >= 0),
                    "kind": kind, "window": windows[kind], **chosen.record(prepared.target_tokens),
                    "prefix_corrupted": list(bridges),
                    # layer-0 restorations here copy back the corrupted token itself, not stored knowledge
                    "restores_corrupted": bool(set(pos) & corrupted_all),
                    "p_clean": prepared.p_clean, "p_corrupt": prepared.p_corrupt,
                    "p_restored": [float(x) for x in p[k]],
                    "effect": [float(x) for x in effect],
                    "normalised": [float(x) if np.isfinite(x) else None for x in normalised],
                    "engine": prepared.extra.get("engine", engine.name),
                    "fast_prefix": prepared.extra.get("prefix_mode"),  # shared / tiled (fast engine only)
                })
    return rows


def load_adapter(options: TraceOptions) -> ModelAdapter:
    adapter = load_model(options.model, dtype=options.dtype, device=options.device,
                         trust_remote_code=options.trust_remote_code, revision=options.revision,
                         device_map=options.device_map, max_pixels=options.max_pixels)
    return adapter.text_only() if options.text_only else adapter


def run_trace(options: TraceOptions, adapter: ModelAdapter | None = None) -> Path:
    """Trace every correctly answered question of a split; write trace_stats.json, traces.parquet and plots.

    Returns the output folder. On an interrupt (Ctrl-C) the questions traced so far are written with
    ``"complete": false`` (which every reader refuses) and the interrupt is re-raised; on an error
    nothing is written.
    """


    options.check()
    adapter = adapter if adapter is not None else load_adapter(options)
    if options.text_only and adapter.is_multimodal:
        adapter = adapter.text_only()
    if max(windows_by_kind(options.window, adapter.num_layers).values()) > adapter.num_layers:
        raise UserError(f"--window {options.window} is larger than the model ({adapter.num_layers} layers)")
    replacement_record(options, adapter)  # a blank or whitespace-only replacement fails here, before any work
    split = load_split(options.data, options.config, options.split)
    records, predictions = shard_records(adapter, list(split.records(options.limit)), options.shard,
                                         options.max_new_tokens)
    engine = make_engine(options.engine, max_batch=options.max_batch, cache_budget_bytes=options.cache_budget)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    skips = Skips()
    traced = 0
    bar = tqdm(total=0, unit="restoration", disable=not options.progress, desc="tracing")
    try:
        for record, prediction in zip(records, predictions):
            if options.traced == "correct" and not answer_correct(prediction, record.answers):
                skips.add("wrong_answer", f"{record.id}: answered {prediction!r}, expected {record.answers[0]!r}")
                continue
            try:
                rows.extend(trace_record(adapter, record, engine, options, bar, prediction))
            except ConstraintNotFound as error:
                skips.add("constraint_not_found", f"{record.id}: {error}")
                continue
            traced += 1
    except KeyboardInterrupt:
        document = stats_document(options, adapter, split, rows, len(records), traced, skips, complete=False)
        stats.write_parquet(out / "traces.parquet", rows)
        stats.write_json(out / "trace_stats.json", document)
        raise interrupted(out / "trace_stats.json") from None
    finally:
        bar.close()
    document = stats_document(options, adapter, split, rows, len(records), traced, skips)
    stats.write_parquet(out / "traces.parquet", rows)
    stats.write_json(out / "trace_stats.json", document)
    if rows:
        plots.plot_all(document, out)
        if options.positions == "all":
            plots.plot_examples(document, rows, out)
    return out


def shard_records(adapter, records: list, shard: str | None,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list, list[str]]:
    """This shard's records and the model's answers to them.

    Answers are generated in batches fixed by position in the whole list (as ``evaluate`` does), so a
    shard sees exactly the answers an unsharded run would, and ``merge`` reproduces it.
    """

    parsed = parse_shard(shard)
    start, end = parsed.bounds(len(records)) if parsed else (0, len(records))
    low, high = aligned_window(start, end, len(records), DEFAULT_BATCH_SIZE)
    answers = (generate_answers(adapter, records[low:high], max_new_tokens=max_new_tokens, batch_size=DEFAULT_BATCH_SIZE)
               if end > start else [])
    return records[start:end], answers[start - low : end - low]


def engine_counts(rows: list[dict]) -> dict[str, int]:
    """How many traced units (an example under one corruption) each engine ran; the fast engine hands
    an example to the reference engine when it cannot show exactness for it."""
    units = {(row["id"], row["corrupted"], row["corrupted_index"]): (row.get("engine", "fast"), row.get("fast_prefix"))
             for row in rows}
    counts = {name: sum(1 for engine, _ in units.values() if engine == name) for name in ENGINES}
    # Units the fast engine ran on the tiled cache because shared-prefix attention was not exact for them.
    tiled = sum(1 for engine, prefix in units.values() if engine == "fast" and prefix == "tiled")
    if tiled:
        counts["fast_tiled_prefix"] = tiled
    return counts


def replacement_record(options, adapter: ModelAdapter) -> dict | None:
    """The token every constraint token is replaced by (``replace`` corruption), as traced."""
    return CORRUPTIONS[options.corruption].replacement(adapter, options.replace_token)


def stats_document(options, adapter, split, rows, total, traced, skips, complete: bool = True) -> dict:
    groups = stats.summarise(rows, options.threshold, options.bootstrap, options.seed, options.min_affected)
    document = {
        "schema_version": stats.SCHEMA_VERSION,
        "tool": "vqa-constraints trace",
        "complete": complete,
        "versions": {"vqa_constraints": vqa_constraints.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": {"name": str(options.model), "revision": adapter.revision, "family": adapter.family,
                  "num_layers": adapter.num_layers, "dtype": str(adapter.dtype).replace("torch.", "")},
        "data": {"data": str(options.data), "config": options.config, "split": options.split,
                 "fingerprint": split.fingerprint, "files_sha256": split.files_sha256},
        "options": {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(options).items()
                    if key not in ("model", "data", "out", "progress")},
        "replacement": replacement_record(options, adapter),
        "windows": windows_by_kind(options.window, adapter.num_layers),
        "target": {"mode": options.target, "answer": options.answer, "sources": target_sources(rows),
                   "prefix_subject": options.prefix_subject, "hops": target_hops(rows),
                   "min_affected": options.min_affected, "affected_ratio": stats.AFFECTED_RATIO},
        "counts": {"records": total, "traced": traced, "rows": len(rows), "engines": engine_counts(rows),
                   "skipped": {"wrong_answer": skips.wrong_answer, "constraint_not_found": skips.constraint_not_found},
                   "skip_messages": skips.messages},
        "groups": groups,
    }
    document["peak_mlp_layer"] = stats.peak_of_groups(groups)
    document["peak_mlp_group"] = dict(zip(("corrupted", "target"), stats.PEAK_GROUP))
    stats.validate(document)
    return document


def target_hops(rows: list[dict]) -> dict[str, int]:
    """Traced questions per hop (``targets.Target.hop``): recognition, retrieval (subject in the prefix) or direct."""
    hops = {row["id"]: row.get("hop", "direct") for row in rows}
    return {name: sum(1 for h in hops.values() if h == name) for name in ("recognition", "retrieval", "direct")}


def target_sources(rows: list[dict]) -> dict[str, int]:
    """Traced questions per target source (gold answer found in the output, or the model's own answer)."""
    sources = {(row["id"]): row["answer_source"] for row in rows}
    return {name: sum(1 for s in sources.values() if s == name) for name in SOURCES}


def peak_mlp_layer(trace_stats: dict | str | Path, corrupted: str = "visual", target: str = "last") -> int | None:
    """The peak causal MLP layer of one named group of a finished trace (see ``stats.peak_mlp_layer``)."""
    return stats.peak_mlp_layer(trace_stats, corrupted=corrupted, target=target)

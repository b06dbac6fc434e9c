"""The attention-contribution study over a dataset split, and the files it writes.

    OUT/attention_stats.json     per-layer means (95% bootstrap CI, n), knockout results, AUROCs
                                 (schema: harness/tracing/schemas/attention_stats.schema.json)
    OUT/attention_examples.parquet  one row per analysed question with its per-layer arrays
    OUT/image_to_constraint.png  heatmap: layer x image token -> visual-constraint tokens
    OUT/constraint_to_last.png   line plot: constraint tokens -> last token per layer

``run_attention_study(adapter, split, out)`` is the Python API; the command in
``harness/cli/attention.py`` only parses arguments and prints the summary.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
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
from harness.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, answer_correct, generate, normalize_answer
from harness.shards import aligned_window, parse_shard
from harness.tracing.attention import question_contributions
from harness.tracing.attention_plots import plot_constraint_to_last, plot_image_to_constraint
from harness.tracing.failure_prediction import failure_prediction, locate_entity, prefix_pattern
from harness.tracing.knockout import knockout, layer_bands, next_token_probs
from harness.tracing.targets import choose_target
from vqa_constraints.errors import UserError
from vqa_constraints.files import atomic_path, load_schema

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: the route knockout (every image token cut per band) decides finding 2
STATS_FILE = "attention_stats.json"
EXAMPLES_FILE = "attention_examples.parquet"
SCHEMA = "attention_stats.schema.json"
GROUPS = ("all", "correct", "incorrect")
TARGETS = ("auto", "answer", "subject", "first-token")
# per-layer measures: name -> (row field, scaled to each question's share of its layer sum)
MEASURES = {
    "image_to_visual_constraint": ("image_to_visual_total", False),
    "image_to_visual_constraint_share": ("image_to_visual_total", True),
    "constraint_to_last": ("constraint_to_last", False),
    "constraint_to_last_share": ("constraint_to_last", True),
    "image_to_last": ("image_to_last_total", False),
    "constraint_to_target": ("constraint_to_target", False),
}
# Row-derived blocks, recomputed by `merge` from the shards' rows.
RESULT_KEYS = ("counts", "targets", "per_layer", "top_image_tokens", "knockout", "knockout_bands", "knockout_route",
               "failure_prediction", "finding_2", "finding_4")
MIN_FINDING_2 = 5  # correctly answered questions with a located target needed before finding 2 is tested
# Finding 2's effect size: the share of p(target) lost when every image token is cut from the visual-constraint
# tokens in a band. A route "carries the answer" when the interval's lower bound reaches this share. Stated
# before the controls were measured (they land far on either side: 0.93 routed, 0.03 planted; docs/attention.md).
ROUTE_MARGIN = 0.2


@dataclass(frozen=True)
class StudyOptions:
    top_k: int = 5  # image tokens blocked in the all-layer knockout
    draws: int = 5  # random k-token draws per question
    seed: int = 0
    n_layers: int = 3  # layers summed for failure prediction
    selection_fraction: float = 0.5  # share of questions used to choose those layers
    limit: int | None = None
    knockout_layers: tuple[int, ...] | None = None  # layers where edges are cut (default: all)
    progress: bool = True
    shard: str | None = None  # "I/N": analyse slice I of N of the questions; combine with `merge`
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the greedy answer scored right or wrong (sentence answers need more)
    target: str = "auto"  # what the knockout scores: auto | answer | subject | first-token (see resolve_target)
    band_ks: tuple[int, ...] = (1, 2, 3)  # image tokens cut per band in the banded knockout
    bands: int = 3  # layer bands (thirds)

    def as_json(self) -> dict:
        return {
            "top_k": self.top_k, "draws": self.draws, "seed": self.seed, "n_layers": self.n_layers,
            "selection_fraction": self.selection_fraction, "limit": self.limit,
            "knockout_layers": None if self.knockout_layers is None else list(self.knockout_layers),
            "shard": self.shard, "max_new_tokens": self.max_new_tokens, "target": self.target,
            "band_ks": list(self.band_ks), "bands": self.bands,
        }

    @classmethod
    def from_json(cls, o: dict) -> "StudyOptions":
        return cls(top_k=o["top_k"], draws=o["draws"], seed=o["seed"], n_layers=o["n_layers"],
                   selection_fraction=o["selection_fraction"], limit=o["limit"],
                   knockout_layers=None if o["knockout_layers"] is None else tuple(o["knockout_layers"]),
                   shard=o.get("shard"), max_new_tokens=o.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                   target=o.get("target", "auto"), band_ks=tuple(o.get("band_ks", (1, 2, 3))),
                   bands=o.get("bands", 3))


def _versions() -> dict:
    out = {}
    for package in ("vqa-constraints", "torch", "transformers", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


# --- where each readout is taken ------------------------------------------------


@dataclass(frozen=True)
class Readout:
    """One scored token: the model reads ``encoded`` and p(``token``) is taken at ``position``."""

    mode: str  # answer | subject | first-token
    source: str  # gold (the gold answer / subject found in the model's own output) | own-first-token
    prefix: str  # the model's own words forced before the scored token
    text: str  # the target's text as forced ("" for the model's own top first token)
    encoded: object  # harness.models.base.Encoded
    position: int  # the token whose next-token distribution is read
    token: int | None  # the scored token id (None: the model's top token at ``position``)
    prompt_last: int


def prefix_names_subject(prefix: str, subject: str) -> bool:
    """Does the model's own prefix name the subject (whole words, as ``harness.scoring`` matches answers)?"""
    needle = normalize_answer(subject)
    return bool(needle) and f" {needle} " in f" {normalize_answer(prefix)} "


def readout(adapter, record, prediction: str, mode: str) -> Readout | None:
    """Where ``mode``'s target (``harness.tracing.targets.choose_target``) is predicted, after the model's own
    teacher-forced prefix; None when the target is not in the model's output (mode answer / subject)."""
    golds = [record.subject] if mode == "subject" else record.answers
    target = choose_target(adapter, record.question, record.image, golds, prediction, mode)
    if mode == "first-token":
        return Readout(mode, target.source, "", "", target.encoded, target.prompt_last, None, target.prompt_last)
    if target.source != "gold":
        return None
    first = target.encoded.answer_positions[0]
    token = int(target.encoded.input_ids[0, first])
    return Readout(mode, "gold", target.prefix, target.text, target.encoded, first - 1, token, target.prompt_last)


def resolve_target(adapter, record, prediction: str, requested: str) -> tuple[Readout | None, Readout | None, bool | None]:
    """(the knockout's readout, the answer readout, whether the model's prefix before the answer names the
    subject). ``auto``: the subject (the recognition hop) when the prefix names it, since cutting the image
    from the constraint cannot remove a subject the forced prefix already carries; else the answer."""
    if requested == "first-token":
        return readout(adapter, record, prediction, "first-token"), None, None
    answer = readout(adapter, record, prediction, "answer")
    names = None if answer is None else prefix_names_subject(answer.prefix, record.subject)
    if requested == "answer":
        return answer, answer, names
    if requested == "subject" or names:
        return readout(adapter, record, prediction, "subject"), answer, names
    return answer, answer, names


def _token_text(adapter, token: int | None) -> str | None:
    return None if token is None else adapter.tokenizer.decode([token])


def own_positions(adapter, record, prediction: str):
    """The prompt with the model's own answer forced; (encoded, read positions, scored tokens, char spans of the
    scored tokens within ``prediction``). Read position q predicts the answer token at q + 1."""
    encoded = adapter.encode(record.question, record.image, answer=prediction)
    tokens = list(encoded.answer_positions)
    reads = [q - 1 for q in tokens]
    ids = [int(encoded.input_ids[0, q]) for q in tokens]
    spans = [[int(a) - encoded.answer_start, int(b) - encoded.answer_start] for a, b in
             (encoded.token_char_spans[q] for q in tokens)]
    return encoded, reads, ids, spans


# --- the analysis -----------------------------------------------------------------


def _knockouts(adapter, blocks, qc, target: Readout, p_clean: float, image_to_read: np.ndarray, options: StudyOptions,
               index: int, bands: list[list[int]]) -> dict:
    """All-layer knockouts (image -> constraint, image -> answer positions) and the banded constraint knockout."""
    row = {}
    inputs = target.encoded.inputs
    rng = np.random.default_rng([options.seed, index])  # per question: draws do not depend on other questions
    # "last": every position from the prompt's last token to the read position, since with a forced prefix
    # the image can also reach the read position through the prefix's tokens.
    answer_positions = list(range(target.prompt_last, target.position + 1))
    for name, positions, scores in (
        ("constraint", qc.visual_positions, qc.image_to_visual.sum(axis=0)),
        ("last", answer_positions, image_to_read.sum(axis=0)),
    ):
        result = knockout(adapter.model, blocks, inputs, target.token, positions, qc.image_positions, scores,
                          options.top_k, rng, options.draws, name, p_clean=p_clean,
                          layers=options.knockout_layers, position=target.position)
        row[f"knockout_{name}_top_sources"] = result.top_sources
        row[f"knockout_{name}_p_top"] = result.p_top
        row[f"knockout_{name}_p_random"] = result.p_random
    p_top, p_random, p_all = [], [], []
    for b, band in enumerate(bands):
        # The route itself: every image token cut from the constraint tokens in the band (no draw to compare with).
        every_image_token = {int(t): list(qc.image_positions) for t in qc.visual_positions}
        p_all.append(float(next_token_probs(adapter.model, blocks, inputs, every_image_token, band,
                                            target.position)[target.token]))
        scores = qc.image_to_visual[band].sum(axis=0)  # the band's own most-contributing image tokens
        tops, randoms = [], []
        for k in options.band_ks:
            result = knockout(adapter.model, blocks, inputs, target.token, qc.visual_positions, qc.image_positions,
                              scores, k, np.random.default_rng([options.seed, index, 1 + b, k]), options.draws,
                              "constraint", p_clean=p_clean, layers=band, position=target.position)
            tops.append(result.p_top)
            randoms.append(float(np.mean(result.p_random)))
        p_top.append(tops)
        p_random.append(randoms)
    row["band_p_top"] = p_top  # [band][k]
    row["band_p_all"] = p_all  # [band]: every image token cut from the constraint tokens in the band
    row["band_p_random"] = p_random  # [band][k]: mean over the draws
    return row


def analyse_questions(adapter, records: list, options: StudyOptions, first_index: int = 0,
                      generations: list | None = None, rows: list | None = None,
                      skipped: Counter | None = None) -> tuple[list[dict], Counter]:
    """Contributions (all questions) and knockouts (correctly answered ones): one row per analysed question.

    ``first_index``: where ``records`` start in the whole question list (a shard), which keys the draws.
    ``rows``/``skipped``, when given, are filled in place, so a caller keeps what an interrupt left.
    Every readout is taken where its token is predicted (see ``resolve_target``); a wrong answer's entity is
    located later, from all rows (``summarize``), so it keeps per-position arrays of its own output.
    """
    generations = (generate(adapter, records, max_new_tokens=options.max_new_tokens)
                   if generations is None else generations)
    blocks = [adapter.attention(l) for l in range(adapter.num_layers)]
    bands = layer_bands(adapter.num_layers, options.bands)
    rows = [] if rows is None else rows
    skipped = Counter() if skipped is None else skipped
    for index, (record, generation) in enumerate(
        tqdm(list(zip(records, generations)), desc="attention", disable=not options.progress), start=first_index
    ):
        correct = answer_correct(generation.text, record.answers)
        try:
            target, answer, names = resolve_target(adapter, record, generation.text, options.target)
            # The finding-4 readout: the model's own answer entity (first-token mode: the old prompt-last reading).
            entity = target if options.target == "first-token" else answer
            if entity is not None:
                qc = question_contributions(adapter, record, entity.encoded, [entity.position])
                deferred = None
            else:
                encoded, reads, ids, spans = own_positions(adapter, record, generation.text)
                qc = question_contributions(adapter, record, encoded, reads)
                deferred = (reads, ids, spans)
        except UserError as error:
            reason = "no visual constraint" if "no visual constraint" in str(error) else "constraint not tokenised"
            skipped[reason] += 1
            log.warning("skipping %s: %s", record.id, error)
            continue
        row = {
            "id": record.id,
            "subject": record.subject,
            "question": record.question,
            "constraint_types": record.constraint_types,
            "num_constraints": len(record.constraints),
            "prediction": generation.text,
            "correct": bool(correct),
            "first_token_confidence": float(generation.confidence),
            "image_positions": qc.image_positions,
            "visual_positions": qc.visual_positions,
            "constraint_positions": qc.constraint_positions,
            "prompt_last": qc.prompt_last,
            "image_to_visual": qc.image_to_visual.tolist(),
            "image_to_visual_total": qc.image_to_visual_total.tolist(),
            "prefix_names_subject": names,
        }
        if deferred is None:
            token = int(qc.probs[0].argmax()) if entity.token is None else entity.token
            row.update({
                "entity_located_by": "first-token" if entity.mode == "first-token" else "gold",
                "entity_prefix": entity.prefix, "entity_read_position": entity.position, "entity_token": token,
                "entity_token_text": _token_text(adapter, token), "confidence": float(qc.probs[0, token]),
                "constraint_to_last": qc.constraint_to_read[:, 0].tolist(),
                "image_to_last_total": qc.image_to_read[:, 0].sum(axis=1).tolist(),
            })
        else:
            reads, ids, spans = deferred
            row.update({
                "entity_located_by": None, "own_read_positions": reads, "own_tokens": ids, "own_spans": spans,
                "own_p": [float(qc.probs[i, t]) for i, t in enumerate(ids)],
                "own_constraint_to": qc.constraint_to_read.tolist(),  # [layers][own positions]
                "own_image_to_total": qc.image_to_read.sum(axis=2).tolist(),
            })
        row["target_requested"] = options.target
        if target is not None:
            if target is entity:
                tq, t_image = qc, qc.image_to_read[:, 0]
            else:
                tq = question_contributions(adapter, record, target.encoded, [target.position])
                t_image = tq.image_to_read[:, 0]
            token = int(tq.probs[0].argmax()) if target.token is None else target.token
            target = replace(target, token=token)
            p_target = float(tq.probs[0, token])
            row.update({
                "target_mode": target.mode, "target_source": target.source, "target_prefix": target.prefix,
                "target_text": target.text, "target_read_position": target.position, "target_token": token,
                "target_token_text": _token_text(adapter, token), "p_target": p_target,
                "constraint_to_target": tq.constraint_to_read[:, 0].tolist(),
            })
            if correct:
                row.update(_knockouts(adapter, blocks, qc, target, p_target, t_image, options, index, bands))
        rows.append(row)
    return rows, skipped


# --- statistics ---------------------------------------------------------------------


ENTITY_FIELDS = ("entity_located_by", "entity_prefix", "entity_read_position", "entity_token", "entity_token_text",
                 "confidence", "constraint_to_last", "image_to_last_total")


def locate_entities(rows: list[dict]) -> list[dict]:
    """Rows with every answer entity placed: a wrong answer (or a right one whose gold tokens were not found)
    is located with the prefixes of the right answers to the same question (``locate_entity``); the readout
    fields are taken from its per-position arrays at that place. A row that cannot be located keeps
    ``entity_located_by: None`` and is left out of the readouts (counted in ``targets``)."""
    patterns: dict[str, list] = {}
    for row in rows:
        if row.get("entity_located_by") == "gold":
            pair = (row["entity_prefix"], prefix_pattern(row["entity_prefix"], row["subject"]))
            if pair[0] not in [p for p, _ in patterns.get(row["question"], [])]:
                patterns.setdefault(row["question"], []).append(pair)
    out = []
    for row in rows:
        if row.get("own_tokens") is None:
            out.append(row)
            continue
        row = {**row, **{field: None for field in ENTITY_FIELDS}}
        found = locate_entity(row["prediction"], sorted(patterns.get(row["question"], []), key=lambda p: p[0]))
        if found is not None:
            start, prefix = found
            i = next((i for i, (a, b) in enumerate(row["own_spans"]) if b > start), None)
            if i is not None:
                token = row["own_tokens"][i]
                row.update({
                    "entity_located_by": "prefix-pattern", "entity_prefix": prefix,
                    "entity_read_position": row["own_read_positions"][i], "entity_token": token,
                    "confidence": row["own_p"][i],
                    "constraint_to_last": [layer[i] for layer in row["own_constraint_to"]],
                    "image_to_last_total": [layer[i] for layer in row["own_image_to_total"]],
                })
        out.append(row)
    return out


def _shares(values: np.ndarray) -> np.ndarray:
    """Each layer's share of the question's sum over layers."""
    totals = values.sum(axis=1, keepdims=True)
    return np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)


def per_layer_stats(rows: list[dict], field: str, seed: int, name: str, share: bool = False) -> dict:
    """For each group (all / correct / incorrect): per layer n, mean and 95% bootstrap CI."""
    out = {}
    for group in GROUPS:
        chosen = [r for r in rows if r.get(field) is not None and (group == "all" or r["correct"] == (group == "correct"))]
        layers = []
        if chosen:
            values = np.asarray([r[field] for r in chosen], dtype=np.float64)
            if share:
                values = _shares(values)
            for layer in range(values.shape[1]):
                cell = mean_with_ci(values[:, layer].tolist(), keyed_rng(seed, name, group, str(layer)))
                layers.append({"layer": layer, "n": len(chosen), **cell})
        out[group] = layers
    return out


def knockout_stats(rows: list[dict], target: str, options: StudyOptions) -> dict:
    done = [r for r in rows if r.get(f"knockout_{target}_p_top") is not None]
    p_clean = [r["p_target"] for r in done]
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
        "difference": cell([t - r for t, r in zip(drop_top, drop_random)], "difference"),
        "share_top_hurts_at_least_as_much": (
            None if not done else round(float(np.mean([t >= r - 1e-9 for t, r in zip(drop_top, drop_random)])), 6)
        ),
    }


def band_stats(rows: list[dict], num_layers: int, options: StudyOptions) -> list[dict]:
    """Per (band, k): n, mean p clean / top-k cut / random-k cut, the drops, and the paired per-question
    difference (top drop - random drop) with its 95% bootstrap interval."""
    done = [r for r in rows if r.get("band_p_top") is not None]
    out = []
    for b, band in enumerate(layer_bands(num_layers, options.bands)):
        for i, k in enumerate(options.band_ks):
            clean = np.asarray([r["p_target"] for r in done], dtype=np.float64)
            top = np.asarray([r["band_p_top"][b][i] for r in done], dtype=np.float64)
            rand = np.asarray([r["band_p_random"][b][i] for r in done], dtype=np.float64)
            cell = lambda v, key: mean_with_ci(v.tolist(), keyed_rng(options.seed, "bands", str(b), str(k), key))  # noqa: E731
            out.append({
                "band": [band[0], band[-1]], "k": k, "n": len(done), "draws": options.draws,
                "p_clean": cell(clean, "p_clean"), "p_top": cell(top, "p_top"), "p_random": cell(rand, "p_random"),
                "drop_top": cell(clean - top, "drop_top"), "drop_random": cell(clean - rand, "drop_random"),
                "difference": cell(rand - top, "difference"),
            })
    return out


def route_stats(rows: list[dict], num_layers: int, options: StudyOptions) -> list[dict]:
    """Per band: p(target) with every image token cut from the visual-constraint tokens in the band, the drop,
    and the drop as a share of each question's clean p (mean with its 95% bootstrap interval)."""
    done = [r for r in rows if r.get("band_p_all") is not None]
    clean = np.asarray([r["p_target"] for r in done], dtype=np.float64)
    out = []
    for b, band in enumerate(layer_bands(num_layers, options.bands)):
        cut = np.asarray([r["band_p_all"][b] for r in done], dtype=np.float64)
        cell = lambda v, key: mean_with_ci(v.tolist(), keyed_rng(options.seed, "route", str(b), key))  # noqa: E731
        share = np.divide(clean - cut, clean, out=np.zeros_like(clean), where=clean > 0)
        out.append({"band": [band[0], band[-1]], "n": len(done), "p_clean": cell(clean, "p_clean"),
                    "p_cut": cell(cut, "p_cut"), "drop": cell(clean - cut, "drop"), "share": cell(share, "share")})
    return out


def finding_2(bands: list[dict], route: list[dict], num_layers: int, options: StudyOptions) -> dict:
    """Compact finding-2 block: the route per band (the verdict) and top-k against random-k (the selectivity).

    Rule, on the route: the earliest band whose share of p(target) lost when every image token is cut from the
    constraint tokens has its interval's lower bound at ROUTE_MARGIN or more -> "holds" when that band ends in
    the first half of the layers (last layer < num_layers / 2), "does not hold" when it lies later or every
    first-half band's upper bound is below the margin, otherwise "inconclusive"; "not tested" below
    MIN_FINDING_2 questions. Top-k against random k (the paper's check) says whether the most-contributing
    image tokens carry the route; it is reported, not the verdict: where every image token carries the subject
    (a flag, a planted creature), cutting 3 of them leaves the route intact and the comparison cannot see it.
    """
    k = max(options.band_ks)
    rows = [{"band": c["band"], "k": c["k"], "n": c["n"], "drop_top": c["drop_top"]["value"],
             "drop_random": c["drop_random"]["value"], "difference": c["difference"]["value"],
             "ci_low": c["difference"]["ci_low"], "ci_high": c["difference"]["ci_high"]} for c in bands]
    earliest_by_k = {}
    for kk in options.band_ks:
        above = [c for c in rows if c["k"] == kk and c["ci_low"] is not None and c["ci_low"] > 0]
        earliest_by_k[str(kk)] = above[0]["band"] if above else None
    route_rows = [{"band": c["band"], "n": c["n"], "drop": c["drop"]["value"], "share": c["share"]["value"],
                   "ci_low": c["share"]["ci_low"], "ci_high": c["share"]["ci_high"]} for c in route]
    n = route_rows[0]["n"] if route_rows else 0
    carrying = [c for c in route_rows if c["ci_low"] is not None and c["ci_low"] >= ROUTE_MARGIN]
    earliest = carrying[0]["band"] if carrying else None
    first_half = [c for c in route_rows if c["band"][1] < num_layers / 2]
    if n < MIN_FINDING_2:
        verdict, reason = "not tested", f"{n} correctly answered questions with a located target (need {MIN_FINDING_2})"
    elif not first_half:
        verdict, reason = "not tested", "no band lies in the first half of the layers"
    elif earliest is not None and earliest[1] < num_layers / 2:
        verdict, reason = "holds", (f"layers {earliest[0]}-{earliest[1]}: cutting the image from the constraint "
                                    f"tokens loses at least {ROUTE_MARGIN:.0%} of p(target) (interval)")
    elif earliest is not None or all(c["ci_high"] is not None and c["ci_high"] < ROUTE_MARGIN for c in first_half):
        verdict = "does not hold"
        reason = (f"the earliest band carrying the answer is layers {earliest[0]}-{earliest[1]}" if earliest
                  else f"every first-half band loses less than {ROUTE_MARGIN:.0%} of p(target) (interval)")
    else:
        verdict, reason = "inconclusive", f"first-half intervals straddle the {ROUTE_MARGIN:.0%} margin"
    return {"target": options.target, "k": k, "n": n, "num_layers": num_layers, "margin": ROUTE_MARGIN,
            "route": route_rows, "earliest_route_band": earliest, "bands": rows,
            "earliest_band": earliest_by_k.get(str(k)), "earliest_band_by_k": earliest_by_k,
            "verdict": verdict, "reason": reason}


def finding_4(prediction: dict | None, rows: list[dict], not_located: int) -> dict:
    """Compact finding-4 block from ``failure_prediction``'s result (read at the answer entity)."""
    located = [r for r in rows if r.get("confidence") is not None]
    right = sum(r["correct"] for r in located)
    block = {"read_at": "answer entity", "n": len(located), "n_right": right, "n_wrong": len(located) - right,
             "n_not_located": not_located, "evaluation_n": None, "evaluation_n_right": None,
             "selected_layers": [], "auroc_contribution": None, "contribution_ci_low": None,
             "contribution_ci_high": None, "auroc_confidence": None, "confidence_ci_low": None,
             "confidence_ci_high": None}
    if prediction:
        c = prediction.get("auroc_contribution_ci") or [None, None]
        f = prediction.get("auroc_confidence_ci") or [None, None]
        block.update({"evaluation_n": prediction["evaluation_n"], "evaluation_n_right": prediction["evaluation_n_correct"],
                      "selected_layers": prediction["selected_layers"],
                      "auroc_contribution": prediction["auroc_contribution"], "contribution_ci_low": c[0],
                      "contribution_ci_high": c[1], "auroc_confidence": prediction["auroc_confidence"],
                      "confidence_ci_low": f[0], "confidence_ci_high": f[1]})
    return block


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
    """Every statistic, from the rows alone (so `merge` recomputes a sharded run exactly)."""
    rows = locate_entities(rows)
    located = [r for r in rows if r.get("entity_located_by") is not None]
    not_located = len(rows) - len(located)
    stats = dict(header)
    stats["counts"] = {
        "questions": total,
        "analysed": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "skipped": dict(sorted(skipped.items())),
    }
    stats["targets"] = {
        "requested": options.target,
        "modes": dict(sorted(Counter(r["target_mode"] for r in rows if r.get("target_mode")).items())),
        "not_located": sum(r.get("target_mode") is None for r in rows),
        "prefix_names_subject": sum(bool(r.get("prefix_names_subject")) for r in rows),
        "entity_located_by": dict(sorted(Counter(r["entity_located_by"] or "not located" for r in rows).items())),
    }
    stats["per_layer"] = {name: per_layer_stats(located if name != "image_to_visual_constraint" else rows,
                                                field, options.seed, name, share)
                          for name, (field, share) in MEASURES.items()}
    stats["top_image_tokens"] = top_image_tokens(rows, options.top_k)
    stats["knockout"] = {t: knockout_stats(rows, t, options) for t in ("constraint", "last")}
    num_layers = header["num_layers"]
    stats["knockout_bands"] = band_stats(rows, num_layers, options)
    stats["knockout_route"] = route_stats(rows, num_layers, options)
    if located:
        stats["failure_prediction"] = failure_prediction(
            np.asarray([r["constraint_to_last"] for r in located]),
            [r["confidence"] for r in located],
            [r["correct"] for r in located],
            n_layers=options.n_layers,
            selection_fraction=options.selection_fraction,
            seed=options.seed,
        )
    else:
        stats["failure_prediction"] = None
    stats["finding_2"] = finding_2(stats["knockout_bands"], stats["knockout_route"], num_layers, options)
    stats["finding_4"] = finding_4(stats["failure_prediction"], located, not_located)
    return stats


def validate_stats(stats: dict) -> None:
    jsonschema.validate(json.loads(json.dumps(stats)), load_schema("harness.tracing", "schemas", SCHEMA))


def write_examples(rows: list[dict], path: Path) -> None:
    """Per-question arrays as parquet (via a temporary file and rename)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))  # knockout columns exist only for correct answers
    rows = [{k: row.get(k) for k in keys} for row in rows]
    table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def shard_questions(adapter, records: list, shard: str | None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list, int, list]:
    """(this shard's records, its first index in the whole list, the model's generations for them).

    Generations come from batches fixed by position in the whole list, so a shard gets exactly the
    answers an unsharded run would and ``merge`` reproduces it.
    """

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
        "options": options.as_json(),
        "versions": _versions(),
    }
    rows = locate_entities(rows)  # the parquet shows where each wrong answer's entity was read
    stats = summarize(rows, skipped, len(records), header, options)
    validate_stats(stats)
    write_examples(rows, out / EXAMPLES_FILE)
    if not complete:
        write_json_atomic(out / STATS_FILE, stats)
        raise interrupted(out / STATS_FILE)

    title = f"{Path(str(adapter.name_or_path)).name} · {split.config}/{split.split}"
    plot_image_to_constraint(rows, out / "image_to_constraint.png", title)
    plot_constraint_to_last(stats, out / "constraint_to_last.png", title)
    write_json_atomic(out / STATS_FILE, stats)
    return stats

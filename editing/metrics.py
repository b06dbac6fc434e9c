"""Per-edit metrics, and their averages with paired bootstrap intervals clustered by subject.

The field's conventions (ROME, Meng et al. 2022; EasyEdit), what each number is:

- ``efficacy_score`` (ROME's ES): after the edit, P(new) > P(old) on the edited question, where P is the
  teacher-forced probability of the answer entity (exp of its mean token log-prob, after the model's own
  answer prefix) and "old" is the model's pre-edit answer entity; ``efficacy_magnitude`` (ROME's EM):
  P(new) - P(old). ``efficacy``: the edited question now *generates* the new answer (answer matcher).
- ``generalization_score`` (ROME's PS): the same comparison on the record's paraphrases and other views
  (other images of the entity, or augmented views of the image), averaged per edit; ``generalization``:
  they now generate the new answer (``generalization_paraphrases`` / ``generalization_views`` split it).
- ``neighborhood`` (ROME's NS): on questions of the same relation about other subjects, P(old) > P(new)
  after the edit, with old = that question's own pre-edit answer entity and new = the edit's target;
  ``neighborhood_magnitude``: P(old) - P(new) there.
- ``same_subject``: the same subject's other relations: the answer entity is unchanged (generation).
- ``specificity``: per edit, the mean of ``neighborhood`` and ``same_subject`` (those measured).
- ``locality``: random unrelated questions (other subjects): the answer entity is unchanged (same match
  against the gold answers, same extracted answer); ``locality_tokens`` (EasyEdit's locality): the share of
  their pre-edit answer tokens still top-1 when teacher forced.
- ``subject_kept`` / ``efficacy_subject_kept``: whether answers that named the subject still do.
- headline ``score``: the harmonic mean of efficacy_score, generalization_score and specificity (ROME's
  Score is the harmonic mean of ES, PS and NS); ``score_arithmetic`` the arithmetic mean beside it.

Predictions come from ``harness.scoring`` (the same scoring the evaluator uses).
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from editing.requests import EditRequest
from harness.bootstrap import PERCENTILES_95, RESAMPLES, keyed_rng
from harness.scoring import Prompt, answer_correct, answer_logprobs, as_prompt, generate_answers, normalize_answer


# --- probabilities of answer entities --------------------------------------------


def old_entity(current: str, prefix: str) -> str:
    """The model's pre-edit answer entity: its answer without the prefix and the closing full stop."""
    text = current.strip()
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    return text.strip().rstrip(".!?").strip()


def entity_logprobs(adapter, items: Sequence[tuple[Prompt, str, str]], batch_size: int) -> list[float | None]:
    """Mean token log-prob of each ``entity`` after its prompt and ``prefix`` (ROME compares mean token NLLs)."""
    wanted = [(p, prefix, e) for p, prefix, e in items if e.strip()]
    pairs = []
    for prompt, prefix, entity in wanted:
        pairs.append((prompt, f"{prefix} {entity}" if prefix else entity))
        if prefix:
            pairs.append((prompt, prefix))
    scores = iter(answer_logprobs(adapter, pairs, batch_size=batch_size)) if pairs else iter(())
    out = []
    for prompt, prefix, entity in items:
        if not entity.strip():
            out.append(None)
            continue
        total = next(scores)
        if prefix:
            total -= next(scores)
            tokens = len(adapter.answer_token_ids(f"{prefix} {entity}")) - len(adapter.answer_token_ids(prefix))
        else:
            tokens = len(adapter.answer_token_ids(entity))
        out.append(total / max(1, tokens))
    return out


def _prob(logprob: float) -> float:
    return math.exp(logprob)


# --- the edited request ------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What is asked about one request: the question, its paraphrases, and other views."""

    question: Prompt
    paraphrases: tuple[Prompt, ...]
    views: tuple[Prompt, ...]

    @classmethod
    def of(cls, request: EditRequest) -> "Probe":
        return cls(
            Prompt(request.question, request.image),
            tuple(Prompt(p, request.image) for p in request.paraphrases),
            tuple(Prompt(request.question, v) for v in request.other_views),
        )

    def prompts(self) -> list[Prompt]:
        return [self.question, *self.paraphrases, *self.views]


@dataclass
class Snapshot:
    """The model's answers to one request's probe, the target's log-prob, and P(new), P(old) on every prompt."""

    question: str
    paraphrases: list[str]
    views: list[str]
    target_logprob: float
    new_logprobs: list[float | None] = field(default_factory=list)  # per probe prompt: mean token log-prob of new
    old_logprobs: list[float | None] = field(default_factory=list)  # ... and of the pre-edit answer entity

    def as_dict(self) -> dict:
        return {
            "question": self.question,
            "paraphrases": self.paraphrases,
            "other_views": self.views,
            "target_logprob": round(self.target_logprob, 6),
            "new_logprobs": [None if v is None else round(v, 6) for v in self.new_logprobs],
            "old_logprobs": [None if v is None else round(v, 6) for v in self.old_logprobs],
        }


def snapshot(adapter, request: EditRequest, max_new_tokens: int, batch_size: int) -> Snapshot:
    probe = Probe.of(request)
    prompts = probe.prompts()
    answers = generate_answers(adapter, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    n_par = len(probe.paraphrases)
    logprob = answer_logprobs(adapter, [(probe.question, request.target)], batch_size=1)[0]
    old = old_entity(request.current, request.prefix)
    if normalize_answer(old) == normalize_answer(request.target):
        old = ""  # nothing to compare against
    scored = entity_logprobs(adapter, [(p, request.prefix, e) for p in prompts for e in (request.target, old)],
                             batch_size)
    return Snapshot(answers[0], answers[1 : 1 + n_par], answers[1 + n_par :], logprob, scored[0::2], scored[1::2])


def _beats(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else float(new > old)


def _gap(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else _prob(new) - _prob(old)


def edit_metrics(request: EditRequest, pre: Snapshot, post: Snapshot) -> dict:
    """Efficacy (generation, score, magnitude), generalization and log-prob gain for one request (None where
    nothing was asked)."""
    target = [request.target]
    paraphrases = [answer_correct(a, target) for a in post.paraphrases]
    views = [answer_correct(a, target) for a in post.views]
    efficacy = answer_correct(post.question, target)
    subject = [request.subject]
    # The edited answer named the subject before the edit and no longer does (it may now see another country).
    subject_lost = answer_correct(pre.question, subject) and not answer_correct(post.question, subject)
    pairs = list(zip(post.new_logprobs, post.old_logprobs))
    others = [_beats(n, o) for n, o in pairs[1:]]
    gaps = [_gap(n, o) for n, o in pairs[1:]]
    return {
        "efficacy": float(efficacy),
        "efficacy_score": _beats(*pairs[0]) if pairs else None,
        "efficacy_magnitude": _gap(*pairs[0]) if pairs else None,
        "generalization": _mean(paraphrases + views),
        "generalization_paraphrases": _mean(paraphrases),
        "generalization_views": _mean(views),
        "generalization_score": _mean([v for v in others if v is not None]),
        "generalization_magnitude": _mean([v for v in gaps if v is not None]),
        "subject_kept": subject_kept(request, pre, post),
        "efficacy_subject_kept": float(efficacy and not subject_lost),
        "logprob_gain": post.target_logprob - pre.target_logprob,
    }


def subject_kept(request: EditRequest, pre: Snapshot, post: Snapshot) -> float | None:
    """Of the probe's answers that named the subject before the edit ("The capital of Kenya is …"), the share that
    still name it after: an edit that makes the model see another country passes efficacy without editing the fact.
    None when no pre-edit answer names the subject (a model that answers bare entities)."""
    subject = [request.subject]
    pairs = zip([pre.question, *pre.paraphrases, *pre.views], [post.question, *post.paraphrases, *post.views])
    kept = [answer_correct(after, subject) for before, after in pairs if answer_correct(before, subject)]
    return _mean(kept)


# --- questions an edit should leave alone ---------------------------------------------


def same_prediction(a: str, b: str) -> bool:
    return normalize_answer(a) == normalize_answer(b)


def extracted_answer(answer: str, question: str) -> str:
    """The answer's own words: the normalised answer without the words it repeats from the question."""
    asked = set(normalize_answer(question).split())
    return " ".join(w for w in normalize_answer(answer).split() if w not in asked)


def entity_unchanged(record, before: str, after: str) -> bool:
    """The same match result against the record's gold answers and the same extracted answer."""
    gold = record.answers
    return (answer_correct(before, gold) == answer_correct(after, gold)
            and extracted_answer(before, record.question) == extracted_answer(after, record.question))


@dataclass
class Neighbour:
    """A question of the edited relation about another subject, with its pre-edit answer entity."""

    record: object
    prompt: Prompt
    answer: str  # the pre-edit generated answer
    prefix: str  # its words before the entity (the model's format)
    entity: str  # its pre-edit answer entity: "old" in P(old) > P(new)


def neighbour_scores(adapter, neighbours: Sequence[Neighbour], target: str, batch_size: int) -> tuple:
    """ROME's neighbourhood score (share with P(old) > P(new)) and magnitude (mean P(old) - P(new)), or Nones."""
    usable = [n for n in neighbours if n.entity and normalize_answer(n.entity) != normalize_answer(target)]
    if not usable:
        return None, None
    items = [(n.prompt, n.prefix, e) for n in usable for e in (n.entity, target)]
    scores = entity_logprobs(adapter, items, batch_size)
    old, new = scores[0::2], scores[1::2]
    wins = [_beats(o, n) for o, n in zip(old, new)]
    gaps = [_gap(o, n) for o, n in zip(old, new)]
    return _mean([w for w in wins if w is not None]), _mean([g for g in gaps if g is not None])


@dataclass
class Unrelated:
    """One unrelated question's answer and its teacher-forced token statistics, at one moment."""

    answer: str
    top1: list[int] | None  # the model's top-1 token at each of the pre-edit answer's positions
    logprob: float | None  # summed log-prob of the pre-edit answer
    n_tokens: int


@torch.no_grad()
def unrelated_state(adapter, records: Sequence, answers: Sequence[str], forced: Sequence[str],
                    batch_size: int) -> list[Unrelated]:
    """``answers`` (generated now) with the top-1 tokens and log-prob of ``forced`` (the pre-edit answers)."""
    prompts = [as_prompt(r, adapter) for r in records]
    states: list[Unrelated] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        encodeds = {i: adapter.encode(prompts[i].question, prompts[i].image, answer=forced[i])
                    for i in chunk if forced[i].strip()}
        encodeds = {i: e for i, e in encodeds.items() if e.answer_positions}
        stats = {}
        if encodeds:
            order = list(encodeds)
            batch = adapter.collate([encodeds[i] for i in order], padding_side="right")
            batch = {k: (v.to(adapter.dtype) if v.is_floating_point() else v) for k, v in batch.items()}
            logits = adapter.model(**batch).logits
            for row, i in enumerate(order):
                positions = torch.tensor(encodeds[i].answer_positions, device=logits.device)
                log_probs = torch.log_softmax(logits[row, positions - 1].float(), dim=-1)
                targets = batch["input_ids"][row, positions].to(log_probs.device)
                stats[i] = (log_probs.argmax(-1).tolist(), float(log_probs.gather(-1, targets[:, None]).sum()),
                            len(positions))
        for i in chunk:
            top1, logprob, n = stats.get(i, (None, None, 0))
            states.append(Unrelated(answers[i], top1, logprob, n))
    return states


def locality_measures(records: Sequence, pre: Sequence[Unrelated], post: Sequence[Unrelated]) -> dict:
    """``locality`` (answer entity unchanged) and ``locality_tokens`` (EasyEdit) over the unrelated questions."""
    if not pre:
        return {"locality": None, "locality_tokens": None}
    same, tokens = [], []
    for record, a, b in zip(records, pre, post):
        same.append(entity_unchanged(record, a.answer, b.answer))
        if a.top1 is not None and b.top1 is not None and a.n_tokens:
            tokens.append(float(np.mean([x == y for x, y in zip(a.top1, b.top1)])))
    return {"locality": float(np.mean(same)), "locality_tokens": _mean(tokens)}


def specificity_of(row: dict) -> float | None:
    """Per edit: the mean of the neighbourhood and same-subject scores that were measured."""
    parts = [row.get(k) for k in ("neighborhood", "same_subject")]
    return _mean([p for p in parts if p is not None])


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


# --- summaries: bootstrap clustered by subject ------------------------------------------

HEADLINE = ("efficacy_score", "generalization_score", "specificity")


def harmonic_mean(*values):
    """Elementwise harmonic mean (0 where any part is 0, NaN where any is NaN); scalars or arrays."""
    parts = np.stack([np.asarray(v, dtype=float) for v in values])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = len(values) / np.sum(1.0 / parts, axis=0)
    out = np.where(np.any(parts == 0, axis=0), 0.0, out)
    return np.where(np.any(np.isnan(parts), axis=0), np.nan, out)


class ClusterBootstrap:
    """Percentile bootstrap that resamples subjects (all of a subject's edits together), the same draws for
    every metric and every method given the same subjects: intervals and paired differences come out consistent."""

    def __init__(self, subjects: Sequence[str], seed: int, *key: str, resamples: int = RESAMPLES):
        names = sorted(set(subjects))
        lookup = {name: i for i, name in enumerate(names)}
        self.index = np.array([lookup[s] for s in subjects], dtype=int)
        self.n_subjects = len(names)
        self.draws = keyed_rng(seed, *key).integers(0, max(1, self.n_subjects), size=(resamples, self.n_subjects))

    def resampled(self, values: Sequence[float | None]) -> tuple[float, np.ndarray]:
        """(mean, the mean in every resample) of ``values`` (None left out; NaN where a resample has none)."""
        data = np.array([np.nan if v is None else v for v in values], dtype=float)
        ok = ~np.isnan(data)
        if not ok.any():
            return float("nan"), np.full(len(self.draws), np.nan)
        sums = np.bincount(self.index[ok], weights=data[ok], minlength=self.n_subjects)
        counts = np.bincount(self.index[ok], minlength=self.n_subjects).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            means = sums[self.draws].sum(1) / counts[self.draws].sum(1)
        return float(data[ok].mean()), means

    def stat(self, values: Sequence[float | None]) -> dict:
        mean, means = self.resampled(values)
        n = sum(v is not None for v in values)
        return interval(mean, means, n, self.n_subjects)


def interval(mean: float, means: np.ndarray, n: int, n_subjects: int) -> dict:
    if n == 0 or math.isnan(mean):
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "n_subjects": 0}
    finite = means[~np.isnan(means)]
    low, high = np.percentile(finite, PERCENTILES_95) if finite.size else (mean, mean)
    return {"mean": round(float(mean), 6), "ci_low": round(float(low), 6), "ci_high": round(float(high), 6),
            "n": int(n), "n_subjects": int(n_subjects)}


SUMMARY_KEYS = ("efficacy", "efficacy_score", "efficacy_magnitude", "generalization", "generalization_paraphrases",
                "generalization_views", "generalization_score", "generalization_magnitude", "neighborhood",
                "neighborhood_magnitude", "same_subject", "specificity", "locality", "locality_tokens",
                "subject_kept", "efficacy_subject_kept", "logprob_gain")


def summarise_rows(rows: Sequence[dict], seed: int, name: str) -> dict:
    """Every metric of ``rows`` (one per edit, with ``subject``) with 95% intervals clustered by subject; the
    harmonic-mean headline ``score`` (and ``score_arithmetic``) with their intervals from the same resamples."""
    boot = ClusterBootstrap([r["subject"] for r in rows], seed, "editing", name)
    out = {key: boot.stat([r.get(key) for r in rows]) for key in SUMMARY_KEYS}
    parts = [boot.resampled([r.get(k) for r in rows]) for k in HEADLINE]
    means = [p[0] for p in parts]
    for key, combine in (("score", harmonic_mean), ("score_arithmetic", lambda *v: np.mean(np.stack(v), axis=0))):
        point = float(combine(*means)) if rows else float("nan")
        resampled = combine(*[p[1] for p in parts]) if rows else np.array([])
        cell = interval(point, np.asarray(resampled, dtype=float), len(rows), boot.n_subjects)
        out[key] = cell["mean"]
        out[f"{key}_ci"] = cell
    return out


VERDICTS = ("better", "worse", "no difference detected")


def paired_comparison(rows_a: Sequence[dict], rows_b: Sequence[dict], seed: int, name_a: str, name_b: str) -> dict:
    """The paired difference of the harmonic-mean score, A - B, over the edits both methods made: the same
    resampled subjects (and so the same edits) for both; the verdict from whether the 95% interval excludes 0."""
    by_id = {r["id"]: r for r in rows_b}
    common = [(r, by_id[r["id"]]) for r in rows_a if r["id"] in by_id]
    result = {"method": name_a, "baseline": name_b, "metric": "score (harmonic mean of " + ", ".join(HEADLINE) + ")",
              "n_edits": len(common), "n_subjects": len({a["subject"] for a, _ in common})}
    if not common:
        return {**result, "difference": None, "ci_low": None, "ci_high": None, "verdict": VERDICTS[2]}
    boot = ClusterBootstrap([a["subject"] for a, _ in common], seed, "compare", name_a, name_b)
    scores = []
    for side in (0, 1):
        parts = [boot.resampled([pair[side].get(k) for pair in common]) for k in HEADLINE]
        scores.append((float(harmonic_mean(*[p[0] for p in parts])), harmonic_mean(*[p[1] for p in parts])))
    diff = scores[0][0] - scores[1][0]
    resampled = scores[0][1] - scores[1][1]
    cell = interval(diff, resampled, len(common), boot.n_subjects)
    low, high = cell["ci_low"], cell["ci_high"]
    verdict = VERDICTS[2] if low is None or low <= 0 <= high else (VERDICTS[0] if low > 0 else VERDICTS[1])
    return {**result, "difference": cell["mean"], "ci_low": low, "ci_high": high, "verdict": verdict}


# --- cost ---------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(megabytes, what was measured): CUDA peak allocated since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process_peak_rss"

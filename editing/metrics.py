"""Per-edit metrics and their averages with bootstrap intervals.

- efficacy: the edited question now generates the new answer; plus the gain in
  the new answer's log-probability (teacher forced);
- generalization: the same on the record's paraphrases (same image) and on
  other images of the same entity (same question);
- subject_kept: of those answers that named the subject before the edit, the
  share still naming it after (a model that says the country first can pass
  efficacy by seeing a different country); efficacy_subject_kept: efficacy that
  also requires the edited answer to still name the subject when it did before;
- on a fixed sample of unrelated questions, three views of "nothing else changed":
  ``specificity`` (headline): the answer *entity* is unchanged: the same match
  result against the question's gold answers and the same extracted answer
  (the answer's words that are not the question's, so "The capital of Peru is
  Lima." and "Lima" both extract "peru lima"/"lima" consistently before and after);
  ``locality`` (EasyEdit): the share of the pre-edit answer's tokens that are
  still the top-1 prediction, teacher forced, after the edit (vs before);
  ``neighborhood`` (ROME): how far the pre-edit answer's log-probability
  dropped, as exp(min(0, change of its mean per-token log-prob)): 1.0 when it
  did not drop, 0.5 when each token became half as likely. Its mean drop in
  nats (summed over tokens) is reported beside it as ``neighborhood_drop``.

Predictions come from ``harness.scoring`` (the same scoring the evaluator uses).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from editing.requests import EditRequest
from harness.bootstrap import bootstrap_interval
from harness.scoring import Prompt, answer_correct, answer_logprobs, as_prompt, generate_answers, normalize_answer

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
    """The model's answers to one request's probe (and the target's log-probability)."""

    question: str
    paraphrases: list[str]
    views: list[str]
    target_logprob: float

    def as_dict(self) -> dict:
        return {
            "question": self.question,
            "paraphrases": self.paraphrases,
            "other_views": self.views,
            "target_logprob": round(self.target_logprob, 6),
        }


def snapshot(adapter, request: EditRequest, max_new_tokens: int, batch_size: int) -> Snapshot:
    probe = Probe.of(request)
    answers = generate_answers(adapter, probe.prompts(), max_new_tokens=max_new_tokens, batch_size=batch_size)
    n_par = len(probe.paraphrases)
    logprob = answer_logprobs(adapter, [(probe.question, request.target)], batch_size=1)[0]
    return Snapshot(answers[0], answers[1 : 1 + n_par], answers[1 + n_par :], logprob)


def edit_metrics(request: EditRequest, pre: Snapshot, post: Snapshot) -> dict:
    """Efficacy, generalization and log-prob gain for one request (None where nothing was asked)."""
    target = [request.target]
    paraphrases = [answer_correct(a, target) for a in post.paraphrases]
    views = [answer_correct(a, target) for a in post.views]
    both = paraphrases + views
    efficacy = answer_correct(post.question, target)
    subject = [request.subject]
    # The edited answer named the subject before the edit and no longer does (it may now see another country).
    subject_lost = answer_correct(pre.question, subject) and not answer_correct(post.question, subject)
    return {
        "efficacy": float(efficacy),
        "generalization": _mean(both),
        "generalization_paraphrases": _mean(paraphrases),
        "generalization_views": _mean(views),
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


def same_prediction(a: str, b: str) -> bool:
    return normalize_answer(a) == normalize_answer(b)


def extracted_answer(answer: str, question: str) -> str:
    """The answer's own words: the normalised answer without the words it repeats from the question."""
    asked = set(normalize_answer(question).split())
    return " ".join(w for w in normalize_answer(answer).split() if w not in asked)


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


def specificity_measures(records: Sequence, pre: Sequence[Unrelated], post: Sequence[Unrelated]) -> dict:
    """``specificity``, ``locality``, ``neighborhood`` (and ``neighborhood_drop``) over the unrelated questions."""
    if not pre:
        return {"specificity": None, "locality": None, "neighborhood": None, "neighborhood_drop": None}
    same, local, neighbour, drop = [], [], [], []
    for record, a, b in zip(records, pre, post):
        gold = record.answers
        same.append(answer_correct(a.answer, gold) == answer_correct(b.answer, gold)
                    and extracted_answer(a.answer, record.question) == extracted_answer(b.answer, record.question))
        if a.top1 is not None and b.top1 is not None and a.n_tokens:
            local.append(float(np.mean([x == y for x, y in zip(a.top1, b.top1)])))
            change = (b.logprob - a.logprob) / a.n_tokens
            # Differences below float noise (batch composition) count as no change.
            neighbour.append(1.0 if change > -1e-4 else float(np.exp(change)))
            drop.append(a.logprob - b.logprob)
    return {"specificity": float(np.mean(same)), "locality": _mean(local), "neighborhood": _mean(neighbour),
            "neighborhood_drop": _mean(drop)}


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarise(values: Sequence[float | None], seed: int) -> dict:
    """Mean with a 95% percentile-bootstrap interval over edits (None values left out)."""
    data = np.array([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    low, high = bootstrap_interval(data, np.random.default_rng(seed))
    return {"mean": round(float(data.mean()), 6), "ci_low": round(float(low), 6),
            "ci_high": round(float(high), 6), "n": int(data.size)}


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

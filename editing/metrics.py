"""Per-edit metrics and their averages with bootstrap intervals.

- efficacy: the edited question now generates the new answer; plus the gain in
  the new answer's log-probability (teacher forced);
- generalization: the same on the record's paraphrases (same image) and on
  other images of the same entity (same question);
- specificity: on a fixed sample of unrelated questions, the fraction whose
  generated answer is unchanged from before the edit.

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
from harness.scoring import Prompt, answer_correct, answer_logprobs, generate_answers, normalize_answer

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
    return {
        "efficacy": float(answer_correct(post.question, target)),
        "generalization": _mean(both),
        "generalization_paraphrases": _mean(paraphrases),
        "generalization_views": _mean(views),
        "logprob_gain": post.target_logprob - pre.target_logprob,
    }


def same_prediction(a: str, b: str) -> bool:
    return normalize_answer(a) == normalize_answer(b)


def specificity(pre: Sequence[str], post: Sequence[str]) -> float | None:
    """Fraction of unrelated questions whose answer did not change."""
    if not pre:
        return None
    return float(np.mean([same_prediction(a, b) for a, b in zip(pre, post)]))


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

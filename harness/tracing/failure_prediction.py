"""Does a signal tell right answers from wrong ones? AUROC, with layers chosen on held-out questions.

Both signals are read where the model predicts its own answer entity (after
its own words before it, e.g. "The capital of Afghanistan is"), not at the
prompt's last token: the score for a question is its constraint -> that
position's attention contribution summed over a few layers, and the
confidence is p(the entity's first token) there. A right answer's entity is
the gold answer found in the output; a wrong answer's is located with
``locate_entity`` (the prefix pattern the model uses when it answers the same
question right), and a wrong answer it cannot locate is counted and left out. Which layers is decided on one part
of the questions (the "selection" part: the layers whose own AUROC is
highest there) and the AUROC is then measured on the other part, so the
choice of layers cannot inflate the reported number. The model's confidence
is scored on the same part.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from harness.scoring import normalize_answer


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the probability that a random positive outscores a random negative
    (ties count one half). Computed from average ranks (Mann-Whitney U). None without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over runs of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def auroc_interval(scores: Sequence[float], labels: Sequence[bool], seed: int, resamples: int = 1000) -> list | None:
    """95% interval of the AUROC: percentiles over resamples drawn within each class (so every resample has
    both), seeded. None without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    if len(positives) == 0 or len(negatives) == 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        chosen = np.concatenate([rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        values.append(auroc(scores[chosen], labels[chosen]))
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def split_selection(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)`` into (selection, evaluation) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(order[:cut]), np.sort(order[cut:])


def failure_prediction(
    per_layer: np.ndarray,
    confidence: Sequence[float],
    correct: Sequence[bool],
    n_layers: int = 3,
    selection_fraction: float = 0.5,
    seed: int = 0,
) -> dict:
    """AUROCs of the layer-summed contribution and of confidence as predictors of a correct answer.

    per_layer: [questions, layers] contribution scores. Returns a JSON-ready dict.
    """
    per_layer = np.asarray(per_layer, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    selection, evaluation = split_selection(len(correct), selection_fraction, seed)
    layer_aurocs = [auroc(per_layer[selection, l], correct[selection]) for l in range(per_layer.shape[1])]
    ranked = sorted(
        (l for l, a in enumerate(layer_aurocs) if a is not None), key=lambda l: (-layer_aurocs[l], l)
    )
    chosen = sorted(ranked[:n_layers])
    result = {
        "n": int(len(correct)),
        "n_correct": int(correct.sum()),
        "selection_n": int(len(selection)),
        "evaluation_n": int(len(evaluation)),
        "evaluation_n_correct": int(correct[evaluation].sum()),
        "seed": seed,
        "per_layer_auroc_selection": layer_aurocs,
        "selected_layers": chosen,
        "auroc_contribution": None,
        "auroc_confidence": auroc(confidence[evaluation], correct[evaluation]),
        "auroc_confidence_ci": auroc_interval(confidence[evaluation], correct[evaluation], seed),
        "auroc_contribution_ci": None,
        "note": "",
    }
    if chosen:
        summed = per_layer[evaluation][:, chosen].sum(axis=1)
        result["auroc_contribution"] = auroc(summed, correct[evaluation])
        result["auroc_contribution_ci"] = auroc_interval(summed, correct[evaluation], seed)
    if result["auroc_contribution"] is None or result["auroc_confidence"] is None:
        result["note"] = "AUROC needs both correct and wrong answers in the selection and evaluation parts"
    return result


# --- where a wrong answer's entity is -----------------------------------------------


def prefix_pattern(prefix: str, subject: str) -> re.Pattern | None:
    """A right answer's prefix ("The capital of Afghanistan is ") as a pattern for other answers to the same
    question: the subject's words (whole words, any case) stand for any words, the rest must match exactly
    (case and spacing aside). None when the prefix is empty (an answer that starts with its entity)."""
    if not prefix.strip():
        return None
    words = prefix.split()
    subject_words = subject.split()
    pieces, i = [], 0
    while i < len(words):
        span = words[i : i + len(subject_words)]
        if subject_words and [normalize_answer(w) for w in span] == [normalize_answer(w) for w in subject_words]:
            pieces.append(r"\S+(?:\s+\S+)*?")
            i += len(subject_words)
        else:
            pieces.append(re.escape(words[i]))
            i += 1
    return re.compile(r"\s*" + r"\s+".join(pieces) + r"\s+", re.IGNORECASE)


def locate_entity(prediction: str, patterns: Sequence[tuple[str, re.Pattern | None]]) -> tuple[int, str] | None:
    """(char offset in ``prediction`` where its answer entity begins, the prefix matched) or None.

    ``patterns``: (prefix, pattern) of the right answers to the same question template. The longest
    matching prefix wins; an empty prefix (right answers start with the entity) places the entity at the
    start. None when no right answer to the template exists or none of their prefixes fits.
    """
    best = None
    for prefix, pattern in patterns:
        if pattern is None:
            end = len(prediction) - len(prediction.lstrip())
        else:
            match = pattern.match(prediction)
            if match is None:
                continue
            end = match.end()
        if end < len(prediction) and (best is None or end > best[0]):
            best = (end, prediction[:end])
    return best

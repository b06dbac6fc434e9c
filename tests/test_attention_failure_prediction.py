"""AUROC and the held-out layer choice of the failure-prediction analysis."""

from __future__ import annotations

import numpy as np

from harness.tracing.failure_prediction import auroc, failure_prediction, split_selection


def pairwise_auroc(scores, labels):
    """The definition, by counting every (positive, negative) pair; ties count one half."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    # one positive outranks one of two negatives: 1/2
    assert auroc([0.3, 0.2, 0.4], [True, False, False]) == 0.5
    assert auroc([1.0, 2.0], [True, True]) is None


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, size=30).astype(float)  # many ties
        labels = rng.random(30) < 0.4
        if labels.all() or not labels.any():
            continue
        assert abs(auroc(scores, labels) - pairwise_auroc(scores, labels)) < 1e-12


def test_failure_prediction_picks_informative_layers_on_the_selection_part():
    rng = np.random.default_rng(0)
    n, layers = 200, 6
    correct = rng.random(n) < 0.5
    per_layer = rng.normal(size=(n, layers))
    per_layer[:, 4] += 3.0 * correct  # only layer 4 carries the signal
    confidence = rng.random(n)  # uninformative
    result = failure_prediction(per_layer, confidence, correct, n_layers=1, seed=1)
    assert result["selected_layers"] == [4]
    assert result["auroc_contribution"] > 0.95
    assert 0.3 < result["auroc_confidence"] < 0.7
    assert result["selection_n"] + result["evaluation_n"] == n
    selection, evaluation = split_selection(n, 0.5, 1)
    assert not set(selection) & set(evaluation)
    # the reported AUROC is on the evaluation part only
    assert result["auroc_contribution"] == auroc(per_layer[evaluation, 4], correct[evaluation])


def test_failure_prediction_without_wrong_answers_says_so():
    result = failure_prediction(np.ones((10, 3)), np.ones(10), np.ones(10, dtype=bool))
    assert result["auroc_contribution"] is None and result["auroc_confidence"] is None
    assert result["note"]

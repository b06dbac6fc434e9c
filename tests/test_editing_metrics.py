"""The editing scores' arithmetic: the answer matcher's marks, ROME's comparisons, the harmonic-mean headline,
intervals that resample subjects, and the paired verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from editing.metrics import ClusterBootstrap, harmonic_mean, old_entity, paired_comparison, summarise_rows
from editing.requests import EditRequest, distinct_subject_batches, per_subject, shared_keys
from harness.scoring import answer_correct


def test_a_target_that_starts_with_a_mark_needs_the_mark():
    assert not answer_correct("Ki is the word for it.", [".ki"])  # the word "ki" is not the domain ".ki"
    assert answer_correct("The internet domain of Kiribati is .ki.", [".ki"])
    assert answer_correct(".ki", [".ki"])
    assert answer_correct("Its calling code is +686.", ["+686"]) and not answer_correct("686", ["+686"])
    # Answers without a leading mark match as before.
    assert answer_correct("It is the U.S.A.", ["USA"]) and answer_correct("Paris.", ["paris"])


def test_old_entity_drops_the_prefix_and_the_full_stop():
    assert old_entity("The capital of Nepal is Kathmandu.", "The capital of Nepal is") == "Kathmandu"
    assert old_entity("lowmarsh", "") == "lowmarsh"


def test_harmonic_mean_punishes_a_no_op_edit():
    assert float(harmonic_mean(1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert float(harmonic_mean(0.0, 0.0, 1.0)) == 0.0  # the arithmetic mean would give 0.33
    assert float(harmonic_mean(0.5, 1.0, 1.0)) == pytest.approx(0.75)


def _rows(values_by_subject: dict[str, list[float]], **fixed) -> list[dict]:
    rows = []
    for subject, values in values_by_subject.items():
        for i, value in enumerate(values):
            rows.append({"id": f"{subject}-{i}", "subject": subject, "efficacy_score": value,
                         "generalization_score": value, "specificity": 1.0, **fixed})
    return rows


def test_intervals_resample_subjects_not_edits():
    # Ten edits of one subject carry the evidence of one: the clustered interval is as wide as one subject's.
    values = {"a": [1.0] * 10, "b": [0.0], "c": [1.0], "d": [0.0]}
    boot = ClusterBootstrap([s for s, v in values.items() for _ in v], 0, "t")
    data = [x for v in values.values() for x in v]
    stat = boot.stat(data)
    assert stat["n"] == 13 and stat["n_subjects"] == 4
    assert stat["mean"] == pytest.approx(11 / 13)
    naive = np.random.default_rng(0).integers(0, 13, size=(1000, 13))
    naive_low = np.percentile(np.array(data)[naive].mean(1), 2.5)
    assert stat["ci_low"] < naive_low  # wider than resampling edits as if independent
    assert boot.stat([None] * 13)["mean"] is None


def test_summary_headline_is_the_harmonic_mean_with_its_interval():
    rows = _rows({f"s{i}": [1.0 if i % 4 else 0.0] for i in range(20)})
    summary = summarise_rows(rows, seed=0, name="m")
    e = summary["efficacy_score"]["mean"]
    assert summary["score"] == pytest.approx(float(harmonic_mean(e, e, 1.0)), abs=1e-6)
    assert summary["score_arithmetic"] == pytest.approx((2 * e + 1) / 3, abs=1e-6)
    assert summary["score_ci"]["ci_low"] <= summary["score"] <= summary["score_ci"]["ci_high"]


def test_paired_comparison_verdicts_come_from_the_interval():
    subjects = {f"s{i}": [1.0] for i in range(30)}
    strong = _rows(subjects)
    weak = _rows({s: [0.0 if i % 2 else 1.0] for i, s in enumerate(subjects)})
    better = paired_comparison(strong, weak, 0, "multedit", "ft")
    assert better["verdict"] == "better" and better["ci_low"] > 0
    assert better["n_edits"] == 30 and better["n_subjects"] == 30
    assert paired_comparison(weak, strong, 0, "multedit", "ft")["verdict"] == "worse"
    # One differing edit in 30 is no evidence either way.
    almost = _rows({s: [0.0 if i == 0 else 1.0] for i, s in enumerate(subjects)})
    assert paired_comparison(almost, strong, 0, "multedit", "ft")["verdict"] == "no difference detected"
    # Only edits both methods made are compared.
    assert paired_comparison(strong[:10], weak, 0, "multedit", "ft")["n_edits"] == 10


def _request(rid: str, subject: str, question: str = "What is the capital of the country in this image?"):
    from PIL import Image

    start = question.index("the country")
    colour = (ord(subject[0]) * 2 % 255, 10, 10)
    return EditRequest(id=rid, question=question, image=Image.new("RGB", (8, 8), colour), target="x", current="",
                       subject=subject, relation="capital", track="correction",
                       key_span=(start, start + len("the country in this image")))


def test_batches_hold_distinct_subjects_and_shared_keys_are_found():
    requests = [_request("a1", "a"), _request("a2", "a"), _request("b1", "b"), _request("c1", "c")]
    assert [r.id for r in per_subject(requests, 1)] == ["a1", "b1", "c1"]
    groups = distinct_subject_batches(requests, 3)
    assert [[r.id for r in g] for g in groups] == [["a1", "b1", "c1"], ["a2"]]
    # The same image and the same text up to the constraint: the same key there (and at the image token).
    assert shared_keys(requests, "constraint") == [("a1", "a2")]
    assert shared_keys(requests, "subject-token") == [("a1", "a2")]
    other = _request("a3", "a", "What is the currency of the country in this image?")
    assert shared_keys([requests[0], other], "constraint") == []  # the relation comes before the constraint
    assert shared_keys([requests[0], other], "subject-token") == [("a1", "a3")]


def test_augmented_views_are_other_seeded_views_of_the_image():
    from dataclasses import replace

    from PIL import Image

    from editing.requests import with_augmented_views

    flag = Image.new("RGB", (60, 30), (200, 20, 20))
    flag.paste((20, 20, 200), (0, 0, 30, 15))
    request = replace(_request("f1", "france"), image=flag)
    views = with_augmented_views(request, 2, seed=0).other_views
    assert len(views) == 2 and all(v.size == flag.size for v in views)
    assert all(v.tobytes() != flag.tobytes() for v in views) and views[0].tobytes() != views[1].tobytes()
    assert [v.tobytes() for v in with_augmented_views(request, 2, seed=0).other_views] == [v.tobytes() for v in views]
    # A record that has its own other views keeps them.
    own = replace(request, other_views=(flag,))
    assert with_augmented_views(own, 2, seed=0).other_views == (flag,)

"""Edit methods on a tiny random LLaVA: the closed form, reversibility, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editing.methods import METHODS, make_method, weights_hash
from editing.methods.multedit import MultEdit, closed_form_update, direct_update
from editing.requests import EditRequest
from vqa_constraints.errors import UserError


@pytest.mark.parametrize("n_edits", [1, 3, 7])
def test_low_rank_closed_form_equals_direct_formula(n_edits):
    generator = torch.Generator().manual_seed(n_edits)
    d_out, d_in, lam = 6, 10, 0.3
    W0 = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    K = torch.randn(d_in, n_edits, generator=generator, dtype=torch.float64)
    V = torch.randn(d_out, n_edits, generator=generator, dtype=torch.float64)
    low_rank = closed_form_update(W0, K, V, lam)
    direct = direct_update(W0, K, V, lam)
    assert torch.allclose(low_rank, direct, atol=1e-10)
    # And it is the minimiser: the gradient of ||WK - V||^2 + lam ||W - W0||^2 vanishes there.
    gradient = 2 * (low_rank @ K - V) @ K.T + 2 * lam * (low_rank - W0)
    assert gradient.abs().max() < 1e-9


def test_closed_form_hits_targets_as_ridge_vanishes():
    generator = torch.Generator().manual_seed(0)
    W0 = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    K = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    V = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    W = closed_form_update(W0, K, V, 1e-9)
    assert torch.allclose(W @ K, V, atol=1e-6)
    # A key orthogonal to every edited key is mapped exactly as before.
    q, _ = torch.linalg.qr(torch.cat([K, torch.randn(12, 1, generator=generator, dtype=torch.float64)], 1))
    orthogonal = q[:, -1:]
    assert torch.allclose(W @ orthogonal, W0 @ orthogonal, atol=1e-8)


@pytest.fixture(scope="module")
def tiny_llava(tiny_model_dirs):
    from harness.models.loading import load_model

    return load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")


def _request(target: str, current: str = "") -> EditRequest:
    question = "What is the colour of the creature in this image?"
    start = question.index("the creature")
    return EditRequest(
        id=f"r-{target}", question=question, image=Image.new("RGB", (32, 32), (200, 30, 30)),
        target=target, current=current, subject="x", relation="colour", track="insertion",
        key_span=(start, start + len("the creature in this image")),
    )


def _corpus() -> list:
    from harness.scoring import Prompt

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    questions = ["What is the colour of the creature in this image?", "Which animal is shown in this image?"]
    return [Prompt(q, Image.new("RGB", (32, 32), c)) for q in questions for c in colours]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Key statistics go to a fresh cache, never the developer's."""
    monkeypatch.setenv("VQA_CONSTRAINTS_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("key_position", ["last", "constraint", "subject-token"])
def test_every_method_is_reversible_bit_for_bit(tiny_llava, name, key_position):
    adapter = tiny_llava
    before = weights_hash(adapter.model)
    method = make_method(name, key_position=key_position, steps=3)
    if hasattr(method, "key_corpus"):
        method.key_corpus(_corpus(), "test-corpus")
    handle = method.apply(adapter, [_request("Paris"), _request("Tokyo")], [1])
    edited = adapter.mlp_out_proj(1).weight.detach().clone()
    assert weights_hash(adapter.model) != before, f"{name} changed nothing"
    handle.restore()
    assert weights_hash(adapter.model) == before
    assert not torch.equal(edited, adapter.mlp_out_proj(1).weight)
    # Only the chosen layer's projection is edited and no gradients are left behind.
    assert all(p.grad is None for p in adapter.model.parameters())


def test_multedit_weight_edit_reproduces_the_optimised_value(tiny_llava):
    """After the closed-form write, the model scores the target as the optimised residual did."""
    from harness.scoring import Prompt, answer_logprobs

    adapter = tiny_llava
    request = _request("Tokyo")
    prompt = Prompt(request.question, request.image)
    before = answer_logprobs(adapter, [(prompt, "Tokyo")])[0]
    handle = MultEdit(steps=10, lam=1e-4).apply(adapter, [request], [0])
    after = answer_logprobs(adapter, [(prompt, "Tokyo")])[0]
    handle.restore()
    n_tokens = len(adapter.answer_token_ids("Tokyo"))
    optimised = -handle.info["per_layer"][0]["final_nll"][0] * n_tokens
    assert after > before
    assert after == pytest.approx(optimised, abs=0.05)


def test_bad_inputs_are_user_errors(tiny_llava):
    adapter = tiny_llava
    method = MultEdit(steps=1)
    with pytest.raises(UserError, match="no edit requests"):
        method.apply(adapter, [], [0])
    with pytest.raises(UserError, match="out of range"):
        method.apply(adapter, [_request("Paris")], [adapter.num_layers])
    with pytest.raises(UserError, match="unknown edit method"):
        make_method("rome")


def test_mlp_without_output_projection_is_a_user_error(tiny_model_dirs):
    from harness.models.loading import load_model

    adapter = load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")
    mlp = adapter.mlp(0)
    # An MLP from an unknown architecture: its output projection under a name we do not know.
    mlp.out_linear = mlp.down_proj
    del mlp.down_proj
    with pytest.raises(UserError, match="no recognised output projection"):
        MultEdit(steps=1).apply(adapter, [_request("Paris")], [0])


# --- the covariance form -------------------------------------------------------


@pytest.mark.parametrize("n_edits", [1, 3])
def test_covariance_form_equals_the_direct_formula(n_edits):
    from editing.methods.multedit import covariance_update, direct_covariance_update

    generator = torch.Generator().manual_seed(10 + n_edits)
    d_out, d_in = 5, 9
    W0 = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    K = torch.randn(d_in, n_edits, generator=generator, dtype=torch.float64)
    V = torch.randn(d_out, n_edits, generator=generator, dtype=torch.float64)
    samples = torch.randn(d_in, 50, generator=generator, dtype=torch.float64)
    C = samples @ samples.T / 50
    chol = torch.linalg.cholesky(C)
    W = covariance_update(W0, K, V, lambda M: torch.cholesky_solve(M, chol))
    assert torch.allclose(W, direct_covariance_update(W0, K, V, C), atol=1e-10)
    assert torch.allclose(W @ K, V, atol=1e-10)  # the edited keys are hard constraints
    # MEMIT's d x d normal equations, argmin ||(W - W0) C^1/2||^2 + mu ||W K - V||^2, tend to it as mu grows.
    mu = 1e9
    memit = (W0 @ C + mu * V @ K.T) @ torch.linalg.inv(C + mu * K @ K.T)
    assert torch.allclose(W, memit, atol=1e-6)
    # Among updates that meet the constraints it changes keys drawn from C least.
    other = W + (torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
                 @ (torch.eye(d_in, dtype=torch.float64) - K @ torch.linalg.pinv(K)))
    assert torch.allclose(other @ K, V, atol=1e-8)
    cost = lambda M: float(torch.trace((M - W0) @ C @ (M - W0).T))
    assert cost(W) < cost(other)


@pytest.mark.parametrize("n_edits", [1, 3])
def test_least_squares_form_equals_memits_formula(n_edits):
    """memit-ls: W0 + R (mu I + K^T C^-1 K)^-1 (C^-1 K)^T equals MEMIT's W0 + R K^T (mu C + K K^T)^-1; it leaves a
    residual (W K != V) that shrinks as mu does."""
    from editing.methods.multedit import direct_least_squares_update, least_squares_update

    g = torch.Generator().manual_seed(n_edits)
    d_in, d_out = 12, 7
    A = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / A.shape[1]
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, n_edits, generator=g, dtype=torch.float64)
    V = torch.randn(d_out, n_edits, generator=g, dtype=torch.float64)
    solve = lambda M: torch.linalg.solve(C, M)  # noqa: E731
    for mu in (10.0, 1e-6):
        W = least_squares_update(W0, K, V, solve, mu)
        assert torch.allclose(W, direct_least_squares_update(W0, K, V, C, mu), atol=1e-8)
    assert (least_squares_update(W0, K, V, solve, 10.0) @ K - V).norm() > 1e-3
    assert torch.allclose(least_squares_update(W0, K, V, solve, 1e-9) @ K, V, atol=1e-5)


def test_generic_corpus_covariance_has_many_keys_and_is_cached(tiny_llava):
    from editing.key_stats import GenericCorpus, corpus_covariances, sample_corpus

    adapter = tiny_llava
    corpus = GenericCorpus(n_keys=200, length=20, batch=4, seed=0)
    ids = sample_corpus(adapter, corpus)
    assert ids.shape == (10, 20) and torch.equal(ids, sample_corpus(adapter, corpus))  # seeded, cached
    assert not torch.equal(ids, sample_corpus(adapter, GenericCorpus(n_keys=200, length=20, batch=4, seed=1)))
    first = corpus_covariances(adapter, [1], corpus)[1]
    assert first.n_keys == 200 and corpus_covariances(adapter, [1], corpus)[1].cache_file == first.cache_file
    assert torch.allclose(first.cov, first.cov.T)


def test_key_covariance_is_cached_by_content(tiny_llava, tmp_path):
    from editing.key_stats import key_covariances

    adapter = tiny_llava
    first = key_covariances(adapter, [1], _corpus(), "fp-a")[1]
    again = key_covariances(adapter, [1], _corpus(), "fp-a")[1]
    assert again.cache_file == first.cache_file and torch.equal(again.cov, first.cov)
    assert first.n_questions == len(_corpus()) and first.n_keys > len(_corpus())  # every position, not one per question
    assert key_covariances(adapter, [1], _corpus(), "fp-b")[1].cache_file != first.cache_file
    assert key_covariances(adapter, [1], _corpus()[:4], "fp-a")[1].cache_file != first.cache_file
    # A change to a weight the keys depend on is a new entry; one downstream of them is not.
    upstream = adapter.mlp(0).up_proj.weight if hasattr(adapter.mlp(0), "up_proj") else adapter.mlp_out_proj(0).weight
    downstream = adapter.mlp_out_proj(2).weight
    with torch.no_grad():
        downstream.add_(1.0)
        assert key_covariances(adapter, [1], _corpus(), "fp-a")[1].cache_file == first.cache_file
        downstream.sub_(1.0)
        upstream.add_(1.0)
        changed = key_covariances(adapter, [1], _corpus(), "fp-a")[1].cache_file
        upstream.sub_(1.0)
    assert changed != first.cache_file


def test_multedit_cov_meets_its_constraint_and_edits_less_elsewhere(tiny_llava):
    """The covariance form writes the optimised value exactly; on the corpus keys it moves values less than λI."""
    from editing.methods.multedit import MultEditCovariance, _key_and_value
    from editing.methods.base import request_prompts
    from editing.key_stats import key_covariances

    adapter = tiny_llava
    request = _request("Tokyo")
    cov_method = MultEditCovariance(steps=5)
    cov_method.key_corpus(_corpus(), "test-corpus")
    module = adapter.mlp_out_proj(1)
    prompt = request_prompts(adapter, request, "last")[0]
    key, value = _key_and_value(adapter, module, prompt)
    W0 = module.weight.detach().clone().double()
    handle = cov_method.apply(adapter, [request], [1])
    W = module.weight.detach().double()
    handle.restore()
    cov = key_covariances(adapter, [1], _corpus(), "test-corpus")[1]
    change = (W - W0)
    assert change.abs().max() > 0
    # The change is along C^-1 k: it is orthogonal (in C's metric) to every direction the key does not span.
    direction = cov.solve(key.double()[:, None])[:, 0]
    residual = change - torch.outer(change @ key.double(), direction) / float(direction @ key.double())
    assert residual.abs().max() < 1e-6 * change.abs().max() + 1e-9


# --- the model's own answer format ---------------------------------------------


def test_teacher_forcing_scores_only_the_target_after_the_answer_prefix(tiny_llava):
    from editing.methods.base import teacher_forced

    adapter = tiny_llava
    request = _request("Tokyo")
    bare = teacher_forced(adapter, request.question, request.image, "Tokyo")
    forced = teacher_forced(adapter, request.question, request.image, "Tokyo", prefix="The colour is")
    scored = forced.inputs["input_ids"][0, forced.answer_start:forced.answer_end].tolist()
    assert adapter.tokenizer.decode(scored).strip() == "Tokyo"
    assert scored == bare.inputs["input_ids"][0, bare.answer_start:bare.answer_end].tolist()
    assert forced.answer_start > bare.answer_start  # the prefix is forced, not scored
    assert forced.key_position == bare.key_position  # the key is still read in the prompt


def test_entity_prefix_is_where_the_model_expects_the_answer(tiny_llava):
    """A bare answer has no prefix; in a sentence the chosen cut is a word boundary of the model's own answer."""
    from editing.answer_format import entity_prefix

    adapter = tiny_llava
    request = _request("Tokyo")
    assert entity_prefix(adapter, request.question, request.image, "Paris", "Tokyo") == ""
    sentence = "The colour of the creature is red ."
    prefix = entity_prefix(adapter, request.question, request.image, sentence, "Tokyo")
    assert sentence.startswith(prefix) and (prefix == "" or sentence[len(prefix)] == " ")


# --- speed: batched deltas, early stop -----------------------------------------


def test_batched_delta_optimisation_equals_one_at_a_time(tiny_llava):
    adapter = tiny_llava
    requests = [_request("Tokyo"), _request("Paris and Rome")]
    method = MultEdit(steps=4, patience=99)
    module = adapter.mlp_out_proj(1)
    from editing.methods.base import request_prompts
    from editing.methods.multedit import _key_and_value

    prompts = [request_prompts(adapter, r, "last")[0] for r in requests]
    values = torch.stack([_key_and_value(adapter, module, p)[1] for p in prompts])
    together, losses, _ = method._optimise_deltas(adapter, module, prompts, values)
    for i, prompt in enumerate(prompts):
        alone, loss, _ = method._optimise_deltas(adapter, module, [prompt], values[i : i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-4, rtol=1e-3)
        assert losses[i] == pytest.approx(loss[0], abs=1e-4)


def test_delta_stops_when_the_nll_stops_improving(tiny_llava):
    adapter = tiny_llava
    handle = MultEdit(steps=50, lr=1e-6, patience=2).apply(adapter, [_request("Tokyo")], [1])
    handle.restore()
    assert handle.info["per_layer"][0]["steps"] == [2]  # a tiny step size cannot gain min_gain: stop after patience


# --- FT-L ------------------------------------------------------------------------


def test_ft_l_records_whether_its_bound_was_active(tiny_llava):
    from editing.methods.ft_l import ConstrainedFineTune

    adapter = tiny_llava
    bound = ConstrainedFineTune(steps=3, lr=5e-2)
    handle = bound.apply(adapter, [_request("Tokyo")], [1])
    change = (adapter.mlp_out_proj(1).weight.detach().float() - handle.modules[0][1]["weight"].float()).abs().max()
    handle.restore()
    assert handle.info["bound_active"] and change <= handle.info["linf"] * (1 + 1e-3)
    loose = ConstrainedFineTune(steps=3, lr=1e-4, linf=10.0)
    handle = loose.apply(adapter, [_request("Tokyo")], [1])
    handle.restore()
    assert handle.info["bound_active"] is False and handle.info["clipped_steps"] == 0


@pytest.mark.parametrize("key_position", ["last", "constraint"])
def test_prefix_cached_delta_steps_equal_full_forwards(tiny_llava, key_position):
    """The delta optimisation's steps run only from the earliest key position on (the image is cached once);
    the deltas, losses and written weights are those of full forwards."""
    adapter = tiny_llava
    requests = [_request("Tokyo"), _request("Paris and Rome")]
    results = {}
    for cached in (True, False):
        method = MultEdit(steps=4, patience=99, key_position=key_position, cache_prefix=cached)
        handle = method.apply(adapter, requests, [1])
        results[cached] = (adapter.mlp_out_proj(1).weight.detach().clone(), handle.info)
        handle.restore()
    (w_cached, info_cached), (w_full, info_full) = results[True], results[False]
    assert info_cached["delta_forward"] == ["prefix-cached"] and info_full["delta_forward"] == []
    assert info_cached["delta_start_layers"] == [1]  # the steps ran only the edited layer and those above it
    np.testing.assert_allclose(info_cached["per_layer"][0]["final_nll"], info_full["per_layer"][0]["final_nll"],
                               atol=1e-4)
    torch.testing.assert_close(w_cached, w_full, atol=1e-5, rtol=1e-4)

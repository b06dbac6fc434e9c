"""Edit methods on a tiny random LLaVA: the closed form, reversibility, and bad input."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("key_position", ["last", "constraint"])
def test_every_method_is_reversible_bit_for_bit(tiny_llava, name, key_position):
    adapter = tiny_llava
    before = weights_hash(adapter.model)
    method = make_method(name, key_position=key_position, steps=3)
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

"""Attention knockout: blocked edges get exactly zero attention, nothing else changes where it cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.hooks import edit_kwargs, record_outputs
from harness.tracing.attention import eager_attention
from harness.tracing.knockout import block_edges, knockout, next_token_probs


@pytest.fixture(scope="module")
def tiny_llava(tiny_model_dirs):
    from harness.models.loading import load_model

    return load_model(str(tiny_model_dirs("llava")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def encoded(tiny_llava):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return tiny_llava.encode("What is the capital of the country whose flag is in this image?", image)


def blocks_of(adapter):
    return [adapter.attention(l) for l in range(adapter.num_layers)]


def test_blocked_edges_get_zero_weight_and_rows_stay_normalised(tiny_llava, encoded):
    model, blocks = tiny_llava.model, blocks_of(tiny_llava)
    assert blocks[0].num_key_value_groups > 1  # grouped-query attention
    last, images = encoded.last_position, encoded.image_positions[:3]
    other = encoded.image_positions[-1] + 2  # a text token after the image, not blocked
    names = {f"L{i}": b for i, b in enumerate(blocks)}
    with eager_attention(model), torch.no_grad(), record_outputs(names, index=1) as clean:
        model(**encoded.inputs, use_cache=False)
    with eager_attention(model), torch.no_grad(), edit_kwargs({b: block_edges({last: images}) for b in blocks}), \
            record_outputs(names, index=1) as cut:
        model(**encoded.inputs, use_cache=False)
    for name in names:
        weights = cut[name][0]  # [heads, q, k]
        assert weights[:, last, images].abs().max() == 0
        assert torch.allclose(weights[:, last].sum(-1), torch.ones(weights.shape[0]), atol=1e-5)
        assert clean[name][0][:, last, images].min() > 0
    # layer 0's other rows see the same inputs, so they are untouched
    assert torch.allclose(cut["L0"][0][:, other], clean["L0"][0][:, other])


def test_empty_knockout_reproduces_the_model_with_any_attention_implementation(tiny_llava, encoded):
    model, blocks = tiny_llava.model, blocks_of(tiny_llava)
    with torch.no_grad():
        reference = torch.softmax(model(**encoded.inputs).logits[0, -1].float(), -1)
    # sdpa passes no mask: the editor builds the causal one itself
    assert model.config._attn_implementation != "eager"
    with torch.no_grad(), edit_kwargs({b: block_edges({}) for b in blocks}):
        rebuilt = torch.softmax(model(**encoded.inputs).logits[0, -1].float(), -1)
    assert torch.allclose(rebuilt, reference, atol=1e-5)
    assert torch.allclose(next_token_probs(model, blocks, encoded.inputs), reference, atol=1e-5)


def test_knockout_is_seeded_and_blocks_the_highest_scoring_tokens(tiny_llava, encoded):
    model, blocks = tiny_llava.model, blocks_of(tiny_llava)
    images = encoded.image_positions
    scores = np.arange(len(images), dtype=float)  # the later the token, the higher
    token = int(next_token_probs(model, blocks, encoded.inputs).argmax())
    runs = [
        knockout(model, blocks, encoded.inputs, token, [encoded.last_position], images, scores, k=3,
                 rng=np.random.default_rng(7), draws=3)
        for _ in range(2)
    ]
    assert runs[0].top_sources == [images[-1], images[-2], images[-3]]
    assert runs[0].p_random == runs[1].p_random and runs[0].p_top == runs[1].p_top
    assert len(runs[0].p_random) == 3 and runs[0].p_top != runs[0].p_clean

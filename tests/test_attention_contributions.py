"""Attention contributions add up exactly to what the attention block computes."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from harness.hooks import record_inputs, record_outputs
from harness.tracing.attention import contribution_vectors, eager_attention, run_contributions

IMAGE_TOKEN = 63


def tiny_gqa_llava(text_family: str) -> LlavaForConditionalGeneration:
    """A random LLaVA whose language model uses grouped-query attention (4 query heads, 2 kv heads)."""
    torch.manual_seed(0)
    text_kwargs = dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    text = LlamaConfig(**text_kwargs) if text_family == "llama" else Qwen2Config(**text_kwargs)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    if text_family == "llama":
        # give the o_proj a bias too, so the test covers the bias that no source owns
        for layer in model.model.language_model.layers:
            old = layer.self_attn.o_proj
            layer.self_attn.o_proj = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            layer.self_attn.o_proj.weight.data.copy_(old.weight.data)
            torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.5)
    return model


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * 5 + [7, 8, 9, 10, 11]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16, generator=generator)}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_contributions_sum_to_attention_output(family):
    model = tiny_gqa_llava(family)
    blocks = {f"L{i}": layer.self_attn for i, layer in enumerate(model.model.language_model.layers)}
    assert all(b.num_key_value_groups == 2 for b in blocks.values())
    if family == "qwen2":
        assert blocks["L0"].v_proj.bias is not None  # the value bias is attributed to sources
    seq = inputs()["input_ids"].shape[1]
    targets = list(range(seq))
    with eager_attention(model), torch.no_grad(), record_inputs(blocks) as xs, \
            record_outputs(blocks) as outs, record_outputs(blocks, index=1) as ws:
        model(**inputs(), use_cache=False)
    assert model.config._attn_implementation != "eager"  # restored afterwards
    for name, block in blocks.items():
        vectors, bias = contribution_vectors(block, xs[name], ws[name], targets)
        total = vectors.sum(dim=1) + (0 if bias is None else bias)
        assert total.shape == outs[name][0].shape
        assert torch.allclose(total, outs[name][0].float(), atol=1e-4), (total - outs[name][0]).abs().max()
        # causal: no target receives anything from a later source
        later = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        assert vectors.norm(dim=-1)[later].abs().max() == 0


def test_run_contributions_groups_match_norms_of_summed_vectors():
    model = tiny_gqa_llava("llama")
    blocks = [layer.self_attn for layer in model.model.language_model.layers]
    run = run_contributions(model, blocks, inputs(), targets=[9, 12], source_groups={"image": range(3, 8)})
    assert run.norms.shape == (3, 2, 13)
    assert run.group_norms["image"].shape == (3, 2)
    # the norm of a sum is at most the sum of norms, and positive here
    assert (run.group_norms["image"] <= run.norms[:, :, 3:8].sum(-1) + 1e-5).all()
    assert (run.group_norms["image"] > 0).all()
    assert run.probs.shape[0] == 1 and torch.isclose(run.probs[0].sum(), torch.tensor(1.0))
    with torch.no_grad():
        logits = model(**inputs()).logits[0]
    assert torch.allclose(run.probs[0], torch.softmax(logits[-1], -1), atol=1e-5)
    # read positions other than the last: the distribution that predicts the token after each one
    earlier = run_contributions(model, blocks, inputs(), targets=[9], read_positions=[9, 11])
    assert torch.allclose(earlier.probs, torch.softmax(logits[[9, 11]], -1), atol=1e-5)

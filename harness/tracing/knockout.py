"""Attention knockout: stop chosen target tokens from attending to chosen source tokens.

How. Every attention block is called with an additive attention mask as its
``attention_mask`` keyword; a pre-hook (``harness.hooks.edit_kwargs``) writes
the dtype's minimum into the cells (target i, source j) to block, so after
the softmax i gives j exactly zero weight and the rest of its row is
renormalised. The forward runs under eager attention: in transformers 5
the sdpa path usually passes no mask at all (it relies on ``is_causal``) and
flash-attention ignores dense masks, whereas the eager block adds whatever
float mask it receives. Editing per block (rather than passing a custom 4D
mask to the whole model, which transformers' mask builder may rewrite or
refuse) also lets a knockout be limited to some layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from harness.hooks import edit_kwargs
from harness.tracing.attention import eager_attention


def _additive_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """The block's mask as an additive float mask [batch, 1, queries, keys] (causal when none was given)."""
    dtype = hidden.dtype if hidden.is_floating_point() else torch.float32
    if mask is not None and mask.is_floating_point():
        return mask.clone()
    queries = hidden.shape[1]
    if mask is not None:  # boolean: True = may attend
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    allowed = torch.ones(queries, queries, dtype=torch.bool, device=hidden.device).tril()
    causal = torch.zeros(queries, queries, dtype=dtype, device=hidden.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return causal.expand(hidden.shape[0], 1, queries, queries).clone()


def block_edges(blocked: dict[int, Sequence[int]]):
    """A kwargs editor for ``edit_kwargs``: target position -> source positions it may no longer read."""

    def edit(kwargs: dict) -> dict:
        hidden = kwargs["hidden_states"]
        mask = _additive_mask(kwargs.get("attention_mask"), hidden)
        low = torch.finfo(mask.dtype).min
        offset = mask.shape[-1] - mask.shape[-2]  # keys before the first query (a cached prefix)
        for target, sources in blocked.items():
            if sources:
                mask[:, :, target - offset, list(sources)] = low
        kwargs["attention_mask"] = mask
        return kwargs

    return edit


@torch.no_grad()
def next_token_probs(
    model: nn.Module,
    attention_blocks: Sequence[nn.Module],
    inputs: dict[str, torch.Tensor],
    blocked: dict[int, Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
    position: int = -1,
) -> torch.Tensor:
    """Next-token probabilities at ``position`` (default the last), with ``blocked`` edges cut in ``layers``
    (default all)."""
    chosen = range(len(attention_blocks)) if layers is None else layers
    edits = {attention_blocks[l]: block_edges(blocked) for l in chosen} if blocked else {}
    with eager_attention(model), edit_kwargs(edits):
        logits = model(**inputs, use_cache=False).logits
    return torch.softmax(logits[0, position].float(), dim=-1).cpu()


@dataclass
class KnockoutResult:
    """p(answer) with the top-k contributing image tokens blocked, and with k random ones (several draws)."""

    target: str  # "constraint" (visual-constraint tokens) or "last" (the read position)
    k: int
    p_clean: float
    p_top: float
    p_random: list[float] = field(default_factory=list)
    top_sources: list[int] = field(default_factory=list)  # the blocked image positions, best first

    @property
    def drop_top(self) -> float:
        return self.p_clean - self.p_top

    @property
    def drop_random(self) -> float:
        return self.p_clean - float(np.mean(self.p_random))


def knockout(
    model: nn.Module,
    attention_blocks: Sequence[nn.Module],
    inputs: dict[str, torch.Tensor],
    answer_token: int,
    targets: Sequence[int],
    image_positions: Sequence[int],
    image_scores: np.ndarray,
    k: int,
    rng: np.random.Generator,
    draws: int = 5,
    target_name: str = "constraint",
    p_clean: float | None = None,
    layers: Sequence[int] | None = None,
    position: int = -1,
) -> KnockoutResult:
    """Block ``targets`` from the k image tokens with the highest ``image_scores``, then from k random ones;
    p(``answer_token``) is read at ``position`` (the token that predicts it; default the last).

    ``image_scores`` has one entry per ``image_positions`` entry (e.g. the
    contribution to the targets summed over layers). Random draws come from
    ``rng`` without replacement, so a seeded generator gives the same draws.
    """
    k = min(k, len(image_positions))
    order = np.argsort(-np.asarray(image_scores), kind="stable")[:k]
    top = [int(image_positions[i]) for i in order]

    def p_blocking(sources: list[int]) -> float:
        blocked = {int(t): sources for t in targets}
        return float(next_token_probs(model, attention_blocks, inputs, blocked, layers, position)[answer_token])

    if p_clean is None:
        p_clean = float(next_token_probs(model, attention_blocks, inputs, position=position)[answer_token])
    randoms = []
    for _ in range(draws):
        picked = rng.choice(len(image_positions), size=k, replace=False)
        randoms.append(p_blocking(sorted(int(image_positions[i]) for i in picked)))
    return KnockoutResult(target_name, k, p_clean, p_blocking(top), randoms, top)


def layer_bands(num_layers: int, count: int = 3) -> list[list[int]]:
    """``count`` contiguous bands of layers, as equal as possible, earliest first (thirds by default:
    0-9, 10-19, 20-29 on 30 layers); fewer when the model has fewer layers."""
    return [band.tolist() for band in np.array_split(np.arange(num_layers), min(count, num_layers))]

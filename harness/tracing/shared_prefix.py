"""Attention to a key/value prefix shared by every row of a batch, without copying it per row.

Every restoration in a fast-engine batch continues the same corrupted run: the
rows differ only from the restored position on. The tiled cache repeats the
prefix (system prompt + image tokens) once per row, concatenates it again in
every layer, and SDPA then repeats it once per query head (``repeat_kv``);
on a 2-core CPU those copies were 60% of a restoration's time (docs/performance.md).

Here each layer's attention is computed in two parts and merged exactly:
- the prefix, held once per noise sample ``[samples, kv_heads, P, head_dim]``:
  one batched matrix product for all rows and all heads of a key/value group
  (the queries are regrouped, the prefix is read in place);
- the suffix, causal, per row.
The two softmax parts are merged with their log-sum-exp (the same algebra as
flash attention's blockwise softmax), so the result equals attention over
the concatenated keys up to float rounding.

Rows are ordered ``i * samples + s`` (row continues noise sample ``s``), as in
the fast engine. Used through ``shared_prefix_attention``: it swaps the
language model's attention implementation for this module's function for
the duration of one forward and hands it a ``Cache`` whose layers report the
prefix length (so positions continue after it) but keep no copy of it.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

ATTENTION_NAME = "vqa_constraints_shared_prefix"
# Per-layer (keys, values) of the prefix for the forward now running; read by the attention function.
_PREFIX: contextvars.ContextVar[list[tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "shared_prefix", default=None)
# Attention options this function does not implement: a model passing any of them is refused, and
# the fast engine falls back to the tiled cache (see FastEngine.prepare).
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


class PrefixLayer(DynamicLayer):
    """A cache layer that reports the prefix's length and returns only the new (suffix) keys and values."""

    def __init__(self, keys: torch.Tensor):
        super().__init__()
        self.keys = keys  # kept for get_seq_length / device queries; never concatenated
        self.values = keys
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Attention of suffix queries ``[rows, heads, T, d]`` to the shared prefix plus the rows' own causal
    suffix keys ``[rows, kv_heads, T, d]``; returns ``([rows, T, heads, d], None)`` like the stock functions."""
    prefixes = _PREFIX.get()
    if prefixes is None:
        raise RuntimeError("shared-prefix attention called outside shared_prefix_attention()")
    for option in _UNSUPPORTED:
        if kwargs.get(option) is not None:
            raise ValueError(f"shared-prefix attention does not implement {option}")
    if attention_mask is not None or dropout:
        raise ValueError("shared-prefix attention takes no mask and no dropout")
    prefix_keys, prefix_values = prefixes[module.layer_idx]  # [samples, kv_heads, P, d]
    rows, heads, length, dim = query.shape
    samples, kv_heads, prefix_length, _ = prefix_keys.shape
    group, n = heads // kv_heads, rows // samples
    scale = dim ** -0.5 if scaling is None else scaling
    q = (query * scale).view(n, samples, kv_heads, group, length, dim)  # scaled once, on the small side

    # Prefix part: all rows, heads of a group and suffix positions as one matrix per (sample, kv head).
    q_prefix = q.permute(1, 2, 0, 3, 4, 5).reshape(samples, kv_heads, n * group * length, dim)
    scores = torch.matmul(q_prefix, prefix_keys.transpose(-1, -2)).float()
    max_prefix = scores.amax(-1, keepdim=True)
    weights = scores.sub_(max_prefix).exp_()  # in place: the scores are the largest tensor here
    sum_prefix = weights.sum(-1, keepdim=True)
    out_prefix = torch.matmul(weights.to(prefix_values.dtype), prefix_values).float()

    def to_rows(t: torch.Tensor) -> torch.Tensor:  # [samples, kv, n*g*T, x] -> [n, samples, kv, g, T, x]
        return t.view(samples, kv_heads, n, group, length, t.shape[-1]).permute(2, 0, 1, 3, 4, 5)

    out_prefix, max_prefix, sum_prefix = to_rows(out_prefix), to_rows(max_prefix), to_rows(sum_prefix)

    # Suffix part: each row's own keys, causal.
    k = key.view(n, samples, kv_heads, 1, length, dim)
    v = value.view(n, samples, kv_heads, 1, length, dim)
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    max_suffix = scores.amax(-1, keepdim=True)  # the diagonal is always visible: finite
    weights = torch.exp(scores - max_suffix)
    sum_suffix = weights.sum(-1, keepdim=True)
    out_suffix = torch.matmul(weights.to(v.dtype), v).float()

    # Merge the two softmax parts by their log-sum-exp.
    top = torch.maximum(max_prefix, max_suffix)
    a, b = torch.exp(max_prefix - top), torch.exp(max_suffix - top)
    out = (out_prefix * a + out_suffix * b) / (sum_prefix * a + sum_suffix * b)
    out = out.reshape(rows, heads, length, dim).transpose(1, 2).contiguous().to(query.dtype)
    return out, None


AttentionInterface.register(ATTENTION_NAME, attend)


@contextmanager
def shared_prefix_attention(lm: nn.Module, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
    """For one forward of ``lm``: attention by ``attend`` over ``prefix`` (per layer ``[samples, kv_heads, P, d]``);
    yields the cache to pass as ``cache=``. The configs' attention implementation is restored on exit."""
    configs = {id(lm.config): lm.config}
    for module in lm.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = config
    saved = {key: config._attn_implementation_internal for key, config in configs.items()}
    token = _PREFIX.set(prefix)
    try:
        for config in configs.values():
            # The internal field, not the property: the setter would also rewrite sub-configs.
            config._attn_implementation_internal = ATTENTION_NAME
        yield Cache(layers=[PrefixLayer(keys) for keys, _ in prefix])
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved[key]
        _PREFIX.reset(token)

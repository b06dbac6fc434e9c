"""The fast engine: run only what a restoration can change, many restorations per batch.

Three savings, each exact:
- Positions. In a causal model, restoring position ``q`` cannot change any
  state before ``q``. The corrupted run's key/value cache up to ``q`` (the
  system prompt and all 576 image tokens, for a question-token restoration)
  is computed once per example; a restoration runs only the suffix from ``q``
  on, through the language model alone (no vision tower).
- Layers. Below the first restored layer ``l`` the restored run *is* the
  corrupted run, so it starts at layer ``l`` from the corrupted run's hidden
  states. (Restorations are bucketed by start layer, a few buckets per model,
  so batches stay large; rows in a bucket recompute at most a few layers.)
- Batching. Restorations sharing an earliest position and a start bucket run
  as one batch, chunked so the expanded cache stays within a memory budget.

Starting mid-stack needs a decoder whose forward loops over ``self.layers``
and does nothing else to ``inputs_embeds`` (Llama, Mistral, Qwen2 and kin);
``prepare`` checks that on the example itself and falls back to layer 0 when
the check fails.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from harness.hooks import record_outputs
from vqa_constraints.errors import UserError

from .patching import Prepared, RestoreSet, answer_probability, restoring

DEFAULT_CACHE_BUDGET = 1 << 30  # bytes of expanded key/value cache per batch
DEFAULT_LAYER_BUCKETS = 4


class FastEngine:
    name = "fast"

    def __init__(self, max_batch: int = 64, cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
                 layer_buckets: int = DEFAULT_LAYER_BUCKETS):
        self.max_batch = max_batch
        self.cache_budget_bytes = cache_budget_bytes
        self.layer_buckets = layer_buckets
        self._verified: set[int] = set()

    def prepare(self, prepared: Prepared) -> None:
        """One corrupted run (all noise samples at once): its cache, hidden states and p_corrupt."""
        adapter = prepared.adapter
        if id(adapter.model) not in self._verified:
            self._verify_language_model_alone(prepared)
            self._verified.add(id(adapter.model))
        samples = prepared.corruption.samples
        embeds = prepared.corruption.apply(prepared.clean_embeds.expand(samples, -1, -1))
        layers = {str(i): layer for i, layer in enumerate(adapter.layers())}
        with torch.no_grad(), record_outputs(layers) as hidden:
            out = adapter.language_model()(inputs_embeds=embeds, use_cache=True)
            logits = _lm_head(prepared)(out.last_hidden_state[:, prepared.score_positions])
        prepared.extra["corrupt_embeds"] = embeds
        prepared.extra["corrupt_hidden"] = [hidden[str(i)] for i in range(len(layers))]
        prepared.extra["corrupt_kv"] = _key_values(out.past_key_values)
        prepared.p_corrupt = float(answer_probability(logits, prepared.target_tokens).mean())
        prepared.extra["can_skip_layers"] = self.layer_buckets > 1 and self._skipping_is_exact(prepared, logits)

    def score(self, prepared: Prepared, restore_sets: list[RestoreSet], progress=None) -> np.ndarray:
        """Mean (over noise samples) answer probability for each restore set."""
        out = np.empty(len(restore_sets))
        first_corrupted = prepared.corruption.first_position
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, cells in enumerate(restore_sets):
            if cells and max(q for _, _, q in cells) < first_corrupted:
                # Before the first corrupted position clean and corrupted states are the same:
                # restoring only there changes nothing.
                out[i] = prepared.p_corrupt
                if progress is not None:
                    progress(1)
                continue
            offset = min([q for _, _, q in cells] + [prepared.score_positions[0]])
            groups[(offset, self._start_layer(prepared, cells))].append(i)
        for (offset, start_layer), indices in sorted(groups.items()):
            size = self._chunk_size(prepared, offset)
            for begin in range(0, len(indices), size):
                chunk = indices[begin : begin + size]
                out[chunk] = self._run_suffix(prepared, [restore_sets[i] for i in chunk], offset, start_layer)
                if progress is not None:
                    progress(len(chunk))
        return out

    def _start_layer(self, prepared: Prepared, cells: RestoreSet) -> int:
        """The bucket boundary at or below the first restored layer (0 when skipping is off)."""
        if not cells or not prepared.extra["can_skip_layers"]:
            return 0
        stride = math.ceil(prepared.num_layers / self.layer_buckets)
        return min(layer for _, layer, _ in cells) // stride * stride

    def _chunk_size(self, prepared: Prepared, offset: int) -> int:
        """Restorations per batch so the expanded cache stays within the budget."""
        kv = prepared.extra["corrupt_kv"]
        keys = kv[0][0]  # [samples, kv_heads, T, head_dim]
        per_row = 2 * len(kv) * keys.shape[1] * keys.shape[3] * max(offset, 1) * keys.element_size()
        rows = self.cache_budget_bytes // max(per_row, 1)
        return max(1, min(self.max_batch, rows // prepared.corruption.samples))

    def _forward(self, prepared: Prepared, n: int, offset: int, start_layer: int) -> torch.Tensor:
        """Logits at the score positions of ``n`` copies of the corrupted run, recomputed from ``offset`` and
        ``start_layer`` on (row ``i * samples + s`` continues noise sample ``s``)."""
        if start_layer == 0:
            inputs = prepared.extra["corrupt_embeds"]
        else:
            inputs = prepared.extra["corrupt_hidden"][start_layer - 1]
        inputs = inputs[:, offset:].repeat(n, 1, 1)
        cache = None
        if offset > 0:
            cache = DynamicCache([(_tile(k[:, :, :offset], n), _tile(v[:, :, :offset], n))
                                  for k, v in prepared.extra["corrupt_kv"]])
        lm = prepared.adapter.language_model()
        with layers_from(lm, start_layer):
            out = lm(inputs_embeds=inputs, past_key_values=cache, use_cache=cache is not None)
        return _lm_head(prepared)(out.last_hidden_state[:, [q - offset for q in prepared.score_positions]])

    def _run_suffix(self, prepared: Prepared, restore_sets: list[RestoreSet], offset: int, start_layer: int) -> np.ndarray:
        samples = prepared.corruption.samples
        n = len(restore_sets)
        with torch.no_grad(), restoring(prepared, restore_sets, offset=offset, samples=samples):
            logits = self._forward(prepared, n, offset, start_layer)
        probs = answer_probability(logits, prepared.target_tokens)
        return probs.view(n, samples).mean(dim=1).cpu().numpy()

    def _verify_language_model_alone(self, prepared: Prepared) -> None:
        """The fast engine feeds the language model embeddings directly; models that add something
        outside it (e.g. Qwen2-VL's multimodal rotary positions) would silently give wrong numbers."""
        with torch.no_grad():
            out = prepared.adapter.language_model()(inputs_embeds=prepared.clean_embeds)
            logits = _lm_head(prepared)(out.last_hidden_state[:, prepared.score_positions])
        p = float(answer_probability(logits, prepared.target_tokens)[0])
        if abs(p - prepared.p_clean) > 1e-3 + 1e-2 * prepared.p_clean:
            raise UserError(
                f"{prepared.adapter.name_or_path}: the fast engine does not support this model (its language model "
                f"alone gives p={p:.4g}, the full model {prepared.p_clean:.4g}); use --engine reference"
            )

    def _skipping_is_exact(self, prepared: Prepared, corrupt_logits: torch.Tensor) -> bool:
        """Does starting at a middle layer from the corrupted hidden states reproduce the corrupted run?"""
        middle = prepared.num_layers // 2
        if middle == 0:
            return False
        try:
            with torch.no_grad():
                logits = self._forward(prepared, 1, prepared.score_positions[0], middle)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return False
        return bool(torch.allclose(logits.float(), corrupt_logits.float(), atol=1e-3, rtol=1e-3))


@contextmanager
def layers_from(lm: nn.Module, start: int):
    """Run ``lm`` from decoder layer ``start`` on: its ``layers`` list is cut for the duration.

    Each attention block keeps its own ``layer_idx``, so it still reads and
    writes its own slot of the (full-length) cache.
    """
    if start == 0:
        yield
        return
    full = lm.layers
    lm.layers = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        lm.layers = full


def _tile(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` copies along the batch (row i * samples + s = sample s); a view when there is one sample."""
    if tensor.shape[0] == 1:
        return tensor.expand(n, *tensor.shape[1:])
    return tensor.repeat(n, *([1] * (tensor.dim() - 1)))


def _lm_head(prepared: Prepared):
    return prepared.adapter.model.get_output_embeddings()


def _key_values(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers cache, [batch, kv_heads, T, head_dim] each."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))

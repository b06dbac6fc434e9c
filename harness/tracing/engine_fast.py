"""The fast engine: run only what a restoration can change, many restorations per batch.

In a causal model, restoring position ``q`` cannot change any state before
``q``. So the corrupted run's key/value cache up to ``q`` — the system prompt
and all 576 image tokens for a question-token restoration — is computed once
per example and shared by every restoration whose earliest restored position
is ``q``; each restoration runs only the suffix from ``q`` on, through the
language model alone (no vision tower). Restorations with the same earliest
position are packed into one batch, chunked so the expanded cache stays
within a memory budget.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from transformers import DynamicCache

from .patching import Prepared, RestoreSet, answer_probability, restoring

DEFAULT_CACHE_BUDGET = 1 << 30  # bytes of expanded key/value cache per batch


class FastEngine:
    name = "fast"

    def __init__(self, max_batch: int = 64, cache_budget_bytes: int = DEFAULT_CACHE_BUDGET):
        self.max_batch = max_batch
        self.cache_budget_bytes = cache_budget_bytes

    def prepare(self, prepared: Prepared) -> None:
        """One corrupted run (all noise samples at once) whose cache every restoration reuses."""
        samples = prepared.corruption.samples
        embeds = prepared.corruption.apply(prepared.clean_embeds.expand(samples, -1, -1))
        with torch.no_grad():
            out = prepared.adapter.language_model()(inputs_embeds=embeds, use_cache=True)
            logits = _lm_head(prepared)(out.last_hidden_state[:, -1])
        prepared.extra["corrupt_embeds"] = embeds
        prepared.extra["corrupt_kv"] = _key_values(out.past_key_values)
        prepared.p_corrupt = float(answer_probability(logits, prepared.target_token).mean())

    def score(self, prepared: Prepared, restore_sets: list[RestoreSet], progress=None) -> np.ndarray:
        """Mean (over noise samples) answer probability for each restore set."""
        groups: dict[int, list[int]] = defaultdict(list)
        last = prepared.length - 1
        for i, cells in enumerate(restore_sets):
            groups[min((q for _, _, q in cells), default=last)].append(i)
        out = np.empty(len(restore_sets))
        # Before the first corrupted position the clean and corrupted runs are the same states,
        # so restoring only there changes nothing: the answer stays at p_corrupt.
        unchanged = [offset for offset in groups if offset < prepared.corruption.first_position and _all_before(
            restore_sets, groups[offset], prepared.corruption.first_position)]
        for offset in unchanged:
            indices = groups.pop(offset)
            out[indices] = prepared.p_corrupt
            if progress is not None:
                progress(len(indices))
        for offset in sorted(groups):
            indices = groups[offset]
            size = self._chunk_size(prepared, offset)
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                out[chunk] = self._run_suffix(prepared, [restore_sets[i] for i in chunk], offset)
                if progress is not None:
                    progress(len(chunk))
        return out

    def _chunk_size(self, prepared: Prepared, offset: int) -> int:
        """Restorations per batch so the expanded cache stays within the budget."""
        kv = prepared.extra["corrupt_kv"]
        keys = kv[0][0]  # [samples, kv_heads, T, head_dim]
        per_row = 2 * len(kv) * keys.shape[1] * keys.shape[3] * max(offset, 1) * keys.element_size()
        samples = prepared.corruption.samples
        rows = self.cache_budget_bytes // max(per_row, 1)
        return max(1, min(self.max_batch, rows // samples))

    def _run_suffix(self, prepared: Prepared, restore_sets: list[RestoreSet], offset: int) -> np.ndarray:
        samples = prepared.corruption.samples
        n = len(restore_sets)
        embeds = prepared.extra["corrupt_embeds"][:, offset:].repeat(n, 1, 1)
        cache = None
        if offset > 0:
            # Row i * samples + s continues noise sample s's corrupted prefix.
            cache = DynamicCache(
                [(k[:, :, :offset].repeat(n, 1, 1, 1), v[:, :, :offset].repeat(n, 1, 1, 1)) for k, v in prepared.extra["corrupt_kv"]]
            )
        with torch.no_grad(), restoring(prepared, restore_sets, offset=offset, samples=samples):
            out = prepared.adapter.language_model()(inputs_embeds=embeds, past_key_values=cache, use_cache=cache is not None)
            logits = _lm_head(prepared)(out.last_hidden_state[:, -1])
        probs = answer_probability(logits, prepared.target_token)
        return probs.view(n, samples).mean(dim=1).cpu().numpy()


def _all_before(restore_sets: list[RestoreSet], indices: list[int], position: int) -> bool:
    return all(q < position for i in indices for _, _, q in restore_sets[i])


def _lm_head(prepared: Prepared):
    return prepared.adapter.model.get_output_embeddings()


def _key_values(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers cache, [batch, kv_heads, T, head_dim] each."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))

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
and does nothing else to ``inputs_embeds`` (Llama, Mistral, Qwen2 and kin).

The suffix runs call the language model alone, with the inputs the full
model gave it on the clean run: the input embeddings and the position ids
(Qwen2-VL's 3-D M-RoPE positions; None for families whose language model
counts positions itself). Exactness is checked on every example before it is
traced (``exactness_problem``: the language model alone reproduces p_clean,
and a suffix run reproduces the corrupted run, within ``EXACT_TOLERANCE``); an example
that fails is traced by the reference engine instead, and its rows say so.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from harness.hooks import record_outputs

from .engine_reference import ReferenceEngine
from .patching import Prepared, RestoreSet, answer_probability, restoring
from .shared_prefix import shared_prefix_attention

log = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET = 1 << 30  # bytes of expanded key/value cache per batch on the CPU (no free-memory query)
CUDA_FREE_SHARE = 0.5  # of the GPU's free memory: the rest is left for activations and the allocator
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
DEFAULT_LAYER_BUCKETS = 4
# How a batch reads the corrupted prefix: "shared" attends to one copy (harness/tracing/shared_prefix.py),
# "tiled" repeats it per row in a stock cache (any attention implementation). Tried in this order.
PREFIX_MODES = ("shared", "tiled")
EXACT_TOLERANCE = 1e-4  # largest |p_fast - p_full model| accepted on an example's checks


class FastEngine:
    name = "fast"

    def __init__(self, max_batch: int = 64, cache_budget_bytes: int | None = None,
                 layer_buckets: int = DEFAULT_LAYER_BUCKETS, shared_prefix: bool = True):
        self.max_batch = max_batch
        self.shared_prefix = shared_prefix  # False: always the tiled cache (for comparisons)
        self.cache_budget_bytes = cache_budget_bytes  # None: from the device (see cache_budget)
        self.layer_buckets = layer_buckets
        self.reference = ReferenceEngine()  # for examples whose exactness cannot be shown

    def prepare(self, prepared: Prepared) -> None:
        """One corrupted run (all noise samples at once): its cache, hidden states and p_corrupt; then the
        exactness checks, falling back to the reference engine for this example when one fails."""
        prepared.extra["engine"] = self.name
        adapter = prepared.adapter
        samples = prepared.corruption.samples
        embeds = prepared.corruption.apply(prepared.clean_embeds.expand(samples, -1, -1))
        layers = {str(i): layer for i, layer in enumerate(adapter.layers())}
        with torch.no_grad(), record_outputs(layers) as hidden:
            out = adapter.language_model()(inputs_embeds=embeds, position_ids=_positions(prepared, 0, samples),
                                           use_cache=True)
            logits = _lm_head(prepared)(out.last_hidden_state[:, prepared.score_positions])
        prepared.extra["corrupt_embeds"] = embeds
        prepared.extra["corrupt_hidden"] = [hidden[str(i)] for i in range(len(layers))]
        prepared.extra["corrupt_kv"] = _key_values(out.cache)
        prepared.extra["corrupt_p"] = answer_probability(logits, prepared.target_tokens)  # per noise sample
        prepared.p_corrupt = float(prepared.extra["corrupt_p"].mean())
        problems = []
        for mode in PREFIX_MODES if self.shared_prefix else PREFIX_MODES[1:]:
            prepared.extra["prefix_mode"] = mode
            problem = self.exactness_problem(prepared)
            if problem is None:
                break
            problems.append(f"{mode} prefix: {problem}")
        else:
            reason = "; ".join(problems)
            log.warning("%s: %s; this example is traced with the reference engine", adapter.name_or_path, reason)
            prepared.extra.clear()
            self.reference.prepare(prepared)
            prepared.extra["fallback_reason"] = reason
            return
        if problems:
            log.info("%s: %s; using the tiled prefix", adapter.name_or_path, problems[0])
        prepared.extra["can_skip_layers"] = self.layer_buckets > 1 and self._skipping_is_exact(prepared)

    def score(self, prepared: Prepared, restore_sets: list[RestoreSet], progress=None) -> np.ndarray:
        """Mean (over noise samples) answer probability for each restore set."""
        if prepared.extra["engine"] != self.name:
            return self.reference.score(prepared, restore_sets, progress=progress)
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

    def exactness_problem(self, prepared: Prepared) -> str | None:
        """Why this example cannot be traced exactly by the fast engine (None: it can).

        Two checks, each within ``EXACT_TOLERANCE`` on p: the language model alone on the clean inputs
        gives the full model's p_clean (nothing outside it, such as a logit transform after the head,
        matters); a suffix run from the first corrupted position, on the cached prefix and the real
        position ids, gives the corrupted run for every noise sample.
        """
        with torch.no_grad():
            out = prepared.adapter.language_model()(inputs_embeds=prepared.clean_embeds,
                                                    position_ids=_positions(prepared, 0, 1))
            logits = _lm_head(prepared)(out.last_hidden_state[:, prepared.score_positions])
        p_alone = float(answer_probability(logits, prepared.target_tokens)[0])
        if abs(p_alone - prepared.p_clean) > EXACT_TOLERANCE:
            return f"its language model alone gives p_clean={p_alone:.6g}, the full model {prepared.p_clean:.6g}"
        offset = min(prepared.corruption.first_position, prepared.score_positions[0])
        try:
            with torch.no_grad():
                suffix = answer_probability(self._forward(prepared, 1, offset, 0), prepared.target_tokens)
        except (TypeError, ValueError, RuntimeError) as error:
            return f"a suffix run fails ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        worst = float((suffix - prepared.extra["corrupt_p"]).abs().max())
        if worst > EXACT_TOLERANCE:
            return f"a suffix run from position {offset} differs from the corrupted run by {worst:.3g} in p"
        return None

    def _start_layer(self, prepared: Prepared, cells: RestoreSet) -> int:
        """The bucket boundary at or below the first restored layer (0 when skipping is off)."""
        if not cells or not prepared.extra["can_skip_layers"]:
            return 0
        stride = math.ceil(prepared.num_layers / self.layer_buckets)
        return min(layer for _, layer, _ in cells) // stride * stride

    def _chunk_size(self, prepared: Prepared, offset: int) -> int:
        """Restorations per batch so the per-row memory (the expanded cache, or with a shared prefix one layer's
        float32 attention scores and weights) stays within the budget."""
        kv = prepared.extra["corrupt_kv"]
        keys = kv[0][0]  # [samples, kv_heads, T, head_dim]
        if prepared.extra.get("prefix_mode") == "shared":
            heads = getattr(prepared.adapter.language_model().config, "num_attention_heads", keys.shape[1])
            per_row = 2 * 4 * heads * (keys.shape[2] - offset) * max(offset, 1)
        else:
            per_row = 2 * len(kv) * keys.shape[1] * keys.shape[3] * max(offset, 1) * keys.element_size()
        rows = cache_budget(keys.device, self.cache_budget_bytes) // max(per_row, 1)
        return max(1, min(self.max_batch, rows // prepared.corruption.samples))

    def _forward(self, prepared: Prepared, n: int, offset: int, start_layer: int) -> torch.Tensor:
        """Logits at the score positions of ``n`` copies of the corrupted run, recomputed from ``offset`` and
        ``start_layer`` on (row ``i * samples + s`` continues noise sample ``s``)."""
        if start_layer == 0:
            inputs = prepared.extra["corrupt_embeds"]
        else:
            inputs = prepared.extra["corrupt_hidden"][start_layer - 1]
        inputs = inputs[:, offset:].repeat(n, 1, 1)
        lm = prepared.adapter.language_model()
        positions = _positions(prepared, offset, inputs.shape[0])
        if offset > 0 and prepared.extra.get("prefix_mode") == "shared":
            prefix = [(keys[:, :, :offset], values[:, :, :offset]) for keys, values in prepared.extra["corrupt_kv"]]
            with shared_prefix_attention(lm, prefix) as cache, layers_from(lm, start_layer):
                out = lm(inputs_embeds=inputs, position_ids=positions, cache=cache, use_cache=True)
        else:
            cache = None
            if offset > 0:
                cache = DynamicCache(config=lm.config)
                for layer, (keys, values) in enumerate(prepared.extra["corrupt_kv"]):
                    cache.update(_tile(keys[:, :, :offset], n), _tile(values[:, :, :offset], n), layer)
            with layers_from(lm, start_layer):
                out = lm(inputs_embeds=inputs, position_ids=positions, cache=cache, use_cache=cache is not None)
        return _lm_head(prepared)(out.last_hidden_state[:, [q - offset for q in prepared.score_positions]])

    def _run_suffix(self, prepared: Prepared, restore_sets: list[RestoreSet], offset: int, start_layer: int) -> np.ndarray:
        samples = prepared.corruption.samples
        n = len(restore_sets)
        with torch.no_grad(), restoring(prepared, restore_sets, offset=offset, samples=samples):
            logits = self._forward(prepared, n, offset, start_layer)
        probs = answer_probability(logits, prepared.target_tokens)
        return probs.view(n, samples).mean(dim=1).cpu().numpy()

    def _skipping_is_exact(self, prepared: Prepared) -> bool:
        """Does starting at a middle layer from the corrupted hidden states reproduce the corrupted run?"""
        middle = prepared.num_layers // 2
        if middle == 0:
            return False
        try:
            with torch.no_grad():
                logits = self._forward(prepared, 1, prepared.score_positions[0], middle)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return False
        p = answer_probability(logits, prepared.target_tokens)
        return float((p - prepared.extra["corrupt_p"]).abs().max()) <= EXACT_TOLERANCE


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


def cache_budget(device: torch.device, requested: int | None) -> int:
    """Bytes of expanded cache one batch may use: ``requested`` when given, else a share of the CUDA device's
    free memory (asked each batch, so earlier batches' freed memory counts), else ``DEFAULT_CACHE_BUDGET``."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_SHARE)
    return DEFAULT_CACHE_BUDGET


def parse_bytes(text: str) -> int:
    """A size such as ``2GiB``, ``512MiB``, ``1.5GB`` or ``4096`` (bytes) as a positive byte count."""
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size (e.g. 2GiB, 512MiB, 1GB, 4096)") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r}: a cache budget must be at least 1 byte")
    return int(value)


def _positions(prepared: Prepared, offset: int, rows: int) -> torch.Tensor | None:
    """The clean run's position ids from ``offset`` on, for a batch of ``rows`` (None: the language model
    counts positions itself, continuing after the cache)."""
    if prepared.position_ids is None:
        return None
    positions = prepared.position_ids[..., offset:]  # [..., 1, T - offset]; the batch is dim -2
    return positions.expand(*positions.shape[:-2], rows, positions.shape[-1])


def _lm_head(prepared: Prepared):
    return prepared.adapter.model.get_output_embeddings()


def _key_values(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers cache, [batch, kv_heads, T, head_dim] each."""
    return [(layer.keys, layer.values) for layer in cache.layers]

"""Forward passes that recompute only the tokens an edit's residual can change.

MultEdit's residual delta is added at each request's key position, which
comes after the image and the system prompt. Nothing before the earliest key
position depends on delta, so those positions (576 image tokens and more on a
LLaVA) are run once, with no gradient, into a key/value cache; each of the
delta optimisation's steps then runs only the ~20-40 question and answer
tokens through the language model and its head. The weights do not change
during the optimisation, so the cache stays valid (FT, which trains the
weights, cannot do this).

Exactness is checked, not assumed: at delta = 0 the cached forward must give
the full model's answer NLL for every request within ``TOLERANCE``; otherwise
(a family whose language model cannot be continued from a cache the same way)
the caller uses full forwards, and says so.
"""

from __future__ import annotations

import inspect

import torch

from harness.hooks import record_inputs
from harness.tracing.patching import recording_language_model_inputs

TOLERANCE = 1e-4  # largest |NLL(cached) - NLL(full model)| accepted, per request, at delta = 0


class PrefixCachedForward:
    """Logits of a right-padded batch from position ``offset`` on, the positions before it cached once.

    With ``start_layer`` L > 0 the suffix's input to decoder layer L is computed once too, and each call runs
    only layers L.. (an edit written inside layer L cannot change what enters it).
    """

    def __init__(self, adapter, batch: dict, offset: int, start_layer: int = 0):
        self.adapter, self.offset = adapter, offset
        self.lm = adapter.language_model()
        self.head = adapter.model.get_output_embeddings()
        with torch.no_grad(), recording_language_model_inputs(adapter) as seen:
            adapter.model(**batch, **_keep_one(adapter))
        self.embeds, self.positions = seen["inputs_embeds"], seen["position_ids"]
        self.mask = batch.get("attention_mask")
        with torch.no_grad():
            out = self.lm(inputs_embeds=self.embeds[:, :offset], position_ids=self._positions(0, offset),
                          attention_mask=None if self.mask is None else self.mask[:, :offset], use_cache=True)
        self.cache = out.cache
        self.prefix = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.start_layer, self.suffix_input, self.layers_name = 0, None, None
        if start_layer > 0:
            self._skip_below(adapter, start_layer)

    def _skip_below(self, adapter, start_layer: int) -> None:
        """Record the suffix's hidden state entering ``start_layer``; later calls start there."""
        first = adapter.layers()[0]
        name = next((n for n, child in self.lm.named_children()
                     if isinstance(child, torch.nn.ModuleList) and len(child) and child[0] is first), None)
        if name is None:  # layers not held directly by the language model: run them all
            return
        with torch.no_grad(), record_inputs({"hidden": adapter.layers()[start_layer]}) as seen:
            self._run(self.embeds[:, self.offset:])
        if seen.get("hidden") is not None:
            self.start_layer, self.suffix_input, self.layers_name = start_layer, seen["hidden"], name

    def _positions(self, start: int, end: int | None = None):
        return None if self.positions is None else self.positions[..., start:end]

    def logits(self) -> torch.Tensor:
        """``[rows, T - offset, vocab]``: the logits at positions ``offset`` .. T-1 (hooks on the language model's
        modules see only those positions)."""
        if self.suffix_input is None:
            return self.head(self._run(self.embeds[:, self.offset:]))
        layers = getattr(self.lm, self.layers_name)
        # The decoder loops over whatever list it holds: hand it layers L.. and their input for the duration.
        setattr(self.lm, self.layers_name, torch.nn.ModuleList(list(layers)[self.start_layer:]))
        try:
            return self.head(self._run(self.suffix_input))
        finally:
            setattr(self.lm, self.layers_name, layers)

    def _run(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        try:
            out = self.lm(inputs_embeds=inputs_embeds, position_ids=self._positions(self.offset),
                          attention_mask=self.mask, cache=self.cache, use_cache=True)
        finally:  # drop this step's suffix from the cache: the next step appends its own
            for layer, (keys, values) in zip(self.cache.layers, self.prefix):
                layer.keys, layer.values = keys, values
        return out.last_hidden_state


def logits_to_keep(adapter, count: int) -> int:
    """``count`` when the model's forward can skip the other positions' logits, else 0 (all)."""

    return count if "logits_to_keep" in inspect.signature(adapter.model.forward).parameters else 0


def _keep_one(adapter) -> dict:
    """Ask the model for the last position's logits only, where its forward allows it (the recorded inputs are
    what matter here; a full-vocabulary logit at every image token is most of a forward's memory)."""
    keep = logits_to_keep(adapter, 1)
    return {"logits_to_keep": keep} if keep else {}

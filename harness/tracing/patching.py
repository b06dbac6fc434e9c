"""What both tracing engines share: one prepared example and the restore hook.

A ``Prepared`` example holds everything a restored run needs: the clean and
corrupted input embeddings of the language model, the clean activations of
every (kind, layer) at every position, and the token whose probability is
scored. A restoration is an explicit set of ``(kind, layer, position)``
cells whose clean activation is copied back into the corrupted run; the
engines differ only in how they run a batch of such sets.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.hooks import edit_kwargs, edit_outputs
from harness.models.base import ModelAdapter

KINDS = ("hidden", "mlp", "attn")
Cell = tuple[str, int, int]  # (kind, layer, position)
RestoreSet = frozenset  # of Cell


@dataclass
class Corruption:
    """How the corrupted run differs from the clean one, at the language model's input embeddings.

    ``mode`` names the corruption (corruptions.py). Either the rows at ``positions``
    are overwritten by ``replacement`` (``replace``: the embedding of token
    ``replacement_id``), or ``noise[s]`` is added to them (``noise``: the
    constraint tokens; ``image-noise``: the image features at the image positions).
    Every mode acts on what the language model really receives, after any
    family-specific image processing (LLaVA-NeXT's newline rows, ...).
    """

    mode: str
    positions: list[int]
    replacement: torch.Tensor | None = None  # [H]
    noise: torch.Tensor | None = None  # [samples, len(positions), H]
    replacement_id: int | None = None
    replacement_text: str | None = None

    @property
    def samples(self) -> int:
        return 1 if self.noise is None else int(self.noise.shape[0])

    @property
    def first_position(self) -> int:
        return min(self.positions)

    def apply(self, embeds: torch.Tensor) -> torch.Tensor:
        """Corrupt a [samples, T, H] batch of input embeddings (a new tensor)."""
        out = embeds.clone()
        index = torch.tensor(self.positions, device=out.device)
        if self.replacement is not None:  # every sample sees the same rows
            out[:, index] = self.replacement.to(out.dtype)
        else:
            out[:, index] = out[:, index] + self.noise.to(out.device, out.dtype)
        return out


@dataclass
class Prepared:
    """One example ready for restored runs (both engines read only this)."""

    adapter: ModelAdapter
    inputs: dict[str, torch.Tensor]  # the adapter's model inputs, batch of one
    clean_embeds: torch.Tensor  # [1, T, H] what the language model receives on the clean run
    corruption: Corruption
    clean: dict[str, list[torch.Tensor]]  # kind -> per layer [T, H]
    target_tokens: list[int]  # the answer's first token, or all its tokens (teacher forced)
    score_positions: list[int]  # the positions whose next-token distribution predicts each target token
    p_clean: float
    p_corrupt: float = float("nan")
    # The position ids the model passed its language model on the clean run (None: it let the
    # language model count 0..T-1); Qwen2-VL's are 3-D M-RoPE positions, [3, 1, T].
    position_ids: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # engine-private state (e.g. the corrupted KV cache)

    @property
    def target_token(self) -> int:
        return self.target_tokens[0]

    @property
    def length(self) -> int:
        return int(self.clean_embeds.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.clean["hidden"])


def _with_inputs_embeds(language_model: nn.Module, kwargs: dict) -> dict:
    """The language model's call arguments with ``inputs_embeds`` filled in (a text LM's wrapper
    passes ``input_ids``; a multimodal one has already merged the image features in)."""
    if kwargs.get("inputs_embeds") is None and kwargs.get("input_ids") is not None:
        kwargs["inputs_embeds"] = language_model.get_input_embeddings()(kwargs["input_ids"])
        kwargs["input_ids"] = None
    return kwargs


@contextmanager
def recording_language_model_inputs(adapter: ModelAdapter):
    """Record what the language model is called with: ``{"inputs_embeds": [B, T, H], "position_ids": ...}``.

    Taken at the language model's own input (a pre-hook), so it is exactly what
    every family feeds it, whatever it did to the image features on the way.
    """
    lm = adapter.language_model()
    store: dict[str, torch.Tensor | None] = {}

    def record(kwargs):
        kwargs = _with_inputs_embeds(lm, kwargs)
        store["inputs_embeds"] = kwargs["inputs_embeds"].detach()
        position_ids = kwargs.get("position_ids")
        store["position_ids"] = None if position_ids is None else position_ids.detach()
        return kwargs

    with edit_kwargs({lm: record}):
        yield store


def corrupting(prepared: Prepared):
    """Corrupt the language model's input embeddings (a batch of noise samples) during a full forward."""
    lm = prepared.adapter.language_model()

    def corrupt(kwargs):
        kwargs = _with_inputs_embeds(lm, kwargs)
        kwargs["inputs_embeds"] = prepared.corruption.apply(kwargs["inputs_embeds"])
        return kwargs

    return edit_kwargs({lm: corrupt})


def module_for(adapter: ModelAdapter, kind: str, layer: int) -> nn.Module:
    if kind == "hidden":
        return adapter.layers()[layer]
    if kind == "mlp":
        return adapter.mlp(layer)
    if kind == "attn":
        return adapter.attention(layer)
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


@contextmanager
def restoring(prepared: Prepared, restore_sets: list[RestoreSet], offset: int, samples: int):
    """Copy clean activations into a batch of restored runs.

    Row ``i * samples + s`` of the batch is restore set ``i`` under noise
    sample ``s``; the batch covers sequence positions ``offset`` onwards (the
    fast engine runs only a suffix), so position ``q`` is column ``q - offset``.
    """
    by_module: dict[tuple[str, int], tuple[list[int], list[int], list[int]]] = {}
    for i, cells in enumerate(restore_sets):
        for kind, layer, position in cells:
            rows, cols, sources = by_module.setdefault((kind, layer), ([], [], []))
            for s in range(samples):
                rows.append(i * samples + s)
                cols.append(position - offset)
                sources.append(position)
    edits = {}
    for (kind, layer), (rows, cols, sources) in by_module.items():
        clean = prepared.clean[kind][layer]

        def put(tensor, rows=rows, cols=cols, sources=sources, clean=clean):
            tensor = tensor.clone()
            tensor[rows, cols] = clean[sources].to(tensor.dtype)
            return tensor

        edits[module_for(prepared.adapter, kind, layer)] = put
    with edit_outputs(edits):
        yield


def answer_probability(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Probability of the answer tokens, logits [B, len(tokens), V] at the score positions -> [B]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(tokens, device=logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return logprobs.gather(-1, index).squeeze(-1).sum(dim=-1).exp()

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

from harness.hooks import edit_outputs
from harness.models.base import ModelAdapter

KINDS = ("hidden", "mlp", "attn")
Cell = tuple[str, int, int]  # (kind, layer, position)
RestoreSet = frozenset  # of Cell


@dataclass
class Corruption:
    """How the corrupted run differs from the clean one, at the language model's input.

    ``mode`` is "replace" (embedding rows overwritten by ``replacement``),
    "noise" (``noise[s]`` added to the constraint tokens' embeddings) or
    "image-noise" (``noise[s]`` added to the projected image features, which
    sit at ``positions`` = the image token positions).
    """

    mode: str
    positions: list[int]
    replacement: torch.Tensor | None = None  # [H]
    noise: torch.Tensor | None = None  # [samples, len(positions), H]

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
        if self.mode == "replace":
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

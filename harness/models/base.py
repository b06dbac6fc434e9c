"""The contract every model family implements: where the parts of the network
are, how a question becomes model inputs, and where each token sits.

Tracing, scoring and editing only ever talk to a ``ModelAdapter``; the
family modules (llava.py, qwen2_vl.py, text_lm.py, ...) fill it in. Positions
are always indices into the *expanded* sequence the language model sees
(image placeholders already expanded to one token per image feature).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vqa_constraints.errors import UserError


@dataclass
class Encoded:
    """One prompt, ready for ``model(**inputs)``, with a map from characters to tokens."""

    inputs: dict[str, torch.Tensor]  # batch of one; input_ids, attention_mask, pixel_values, ...
    prompt: str  # the full prompt text (image placeholder unexpanded)
    question_start: int  # char offset of the question inside ``prompt``
    token_char_spans: list[tuple[int, int]]  # per token: [start, end) in ``prompt``; (-1, -1) for image/special tokens
    image_positions: list[int] = field(default_factory=list)  # token indices of image features
    # With teacher forcing (``encode(..., answer=...)``): the tokenized text is
    # ``prompt + separator + answer``; ``text`` holds it and ``token_char_spans``
    # index into it (``prompt`` is its prefix, so prompt spans are unchanged).
    text: str = ""
    answer_start: int | None = None  # char offset of the answer in ``text``
    answer_positions: list[int] = field(default_factory=list)  # token indices of the answer

    def __post_init__(self):
        if not self.text:
            self.text = self.prompt

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    @property
    def last_position(self) -> int:
        """The last token of the prompt: the one whose logits predict the answer."""
        if self.answer_positions:
            return self.answer_positions[0] - 1
        return self.length - 1

    def positions_for_question_span(self, char_start: int, char_end: int) -> list[int]:
        """Token positions covering question characters [char_start, char_end).

        A token belongs to the span when it overlaps it (so a word split into
        sub-tokens, or a token that also carries a leading space, counts).
        Raises UserError when no token covers the span.
        """
        start = self.question_start + char_start
        end = self.question_start + char_end
        positions = [
            i
            for i, (a, b) in enumerate(self.token_char_spans)
            if a >= 0 and a < end and b > start and b > a
        ]
        if not positions:
            raise UserError(
                f"constraint chars {char_start}:{char_end} ({self.prompt[start:end]!r}) map to no token of the prompt"
            )
        return positions


def collate(encodeds: list[Encoded], pad_token_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Batch single-prompt inputs for one forward pass or ``generate``.

    Per-token tensors (``input_ids``, ``attention_mask``, ``token_type_ids``, ...:
    shape ``(1, length)``) are padded to the longest prompt (left by default, so
    every prompt ends at the last column); ``input_ids`` with ``pad_token_id``,
    the rest with 0. Image tensors are concatenated along dim 0, zero-padding
    any ragged dim (e.g. LLaVA-NeXT's patch count; the model reads the real
    count from ``image_sizes``). Positions in each ``Encoded`` shift by
    ``batch_offsets(...)[i]`` under left padding.
    """
    if not encodeds:
        raise ValueError("collate needs at least one Encoded")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    keys = list(encodeds[0].inputs)
    for e in encodeds[1:]:
        if list(e.inputs) != keys:
            raise ValueError(f"cannot batch inputs with different fields: {keys} vs {list(e.inputs)}")
    width = max(e.length for e in encodeds)
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [e.inputs[key] for e in encodeds]
        if all(_is_per_token(e, key) for e in encodeds):
            fill = pad_token_id if key == "input_ids" else 0
            rows = []
            for t in tensors:
                pad = t.new_full((t.shape[0], width - t.shape[-1]), fill)
                rows.append(torch.cat([pad, t] if padding_side == "left" else [t, pad], dim=-1))
            batch[key] = torch.cat(rows, dim=0)
        else:
            batch[key] = _cat_ragged(tensors)
    return batch


def batch_offsets(encodeds: list[Encoded], padding_side: str = "left") -> list[int]:
    """How far each prompt's positions move inside a ``collate`` batch."""
    width = max(e.length for e in encodeds)
    return [width - e.length if padding_side == "left" else 0 for e in encodeds]


# Inputs with one entry per token; everything else (pixels, image sizes/grids) is per image.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _is_per_token(encoded: Encoded, key: str) -> bool:
    return key in PER_TOKEN_KEYS and encoded.inputs[key].shape == encoded.inputs["input_ids"].shape


def _cat_ragged(tensors: list[torch.Tensor]) -> torch.Tensor:
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape[1:]:
            out = t.new_zeros([t.shape[0]] + shape[1:])
            out[tuple(slice(0, n) for n in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=0)


class ModelAdapter:
    """Uniform access to one loaded model (multimodal or text-only).

    Subclasses set ``family`` and implement the methods that raise
    NotImplementedError. Everything is read from the loaded model; nothing is
    hard-coded per checkpoint.
    """

    family: str = "base"
    is_multimodal: bool = True
    device_map: str | None = None  # accelerate's placement when spread over devices (set by load_model)
    max_pixels: int | None = None  # the image pixel budget applied to a dynamic-resolution processor

    def __init__(self, model: nn.Module, processor, tokenizer, name_or_path: str, revision: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.revision = revision

    # --- where the parts are ------------------------------------------------
    def layers(self) -> list[nn.Module]:
        """The language model's decoder layers, in order."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def mlp(self, layer: int) -> nn.Module:
        return self._layer_part(layer, ("mlp", "feed_forward"))

    def attention(self, layer: int) -> nn.Module:
        return self._layer_part(layer, ("self_attn", "attention"))

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        """The MLP's output projection (``down_proj`` in Llama/Qwen), the edited matrix."""
        mlp = self.mlp(layer)
        for name in ("down_proj", "fc2", "c_proj", "dense_4h_to_h"):
            module = getattr(mlp, name, None)
            if isinstance(module, nn.Linear):
                return module
        raise UserError(f"{type(self.model).__name__}: layer {layer} MLP has no recognised output projection")

    def embed_tokens(self) -> nn.Embedding:
        return self.language_model().get_input_embeddings()

    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings + layers + final norm), no LM head."""
        raise NotImplementedError

    def image_features_module(self) -> nn.Module | None:
        """The module whose output is the projected image features, or None (text-only)."""
        return None

    # --- prompts and inputs -------------------------------------------------
    def build_prompt(self, question: str, with_image: bool = True) -> tuple[str, int]:
        """The full prompt for ``question`` and the char offset where the question starts."""
        raise NotImplementedError

    def encode(self, question: str, image=None, answer: str | None = None) -> Encoded:
        """Inputs for one question (and image); ``answer`` is appended for teacher forcing."""
        raise NotImplementedError

    def answer_token_ids(self, answer: str) -> list[int]:
        """Token ids of ``answer`` as it would follow the prompt (leading space handled)."""
        raise NotImplementedError

    def text_only(self) -> "ModelAdapter":
        """The same model's language model alone, prompted with text only (no image)."""
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        return 0

    def collate(self, encodeds: list[Encoded], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """``collate`` with this tokenizer's pad id, tensors moved to the model's device."""
        batch = collate(encodeds, self.pad_token_id, padding_side)
        return {k: v.to(self.device) for k, v in batch.items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _layer_part(self, layer: int, names: tuple[str, ...]) -> nn.Module:
        layers = self.layers()
        if not 0 <= layer < len(layers):
            raise UserError(f"layer {layer} is out of range: {type(self.model).__name__} has {len(layers)} layers")
        for name in names:
            module = getattr(layers[layer], name, None)
            if module is not None:
                return module
        raise UserError(f"{type(self.model).__name__}: layer {layer} has none of {names}")

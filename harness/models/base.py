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

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    @property
    def last_position(self) -> int:
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


class ModelAdapter:
    """Uniform access to one loaded model (multimodal or text-only).

    Subclasses set ``family`` and implement the methods that raise
    NotImplementedError. Everything is read from the loaded model; nothing is
    hard-coded per checkpoint.
    """

    family: str = "base"
    is_multimodal: bool = True

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

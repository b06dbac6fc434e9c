"""Text-only causal LMs (Llama, Qwen2, SmolLM2, Vicuna, ...) and the text-only view of a multimodal model.

The paper compares a multimodal model with its language model alone; both
run through ``TextLMAdapter``: a plain causal LM directly, and a multimodal
model via ``TextOnlyView`` (same weights, no image, the text-only prompt).
"""

from __future__ import annotations

import torch
from torch import nn

from vqa_constraints.errors import UserError

from .base import Encoded, ModelAdapter
from .encoding import positions_overlapping, tokenize_with_spans
from .prompting import answer_separator, chat_template_prompt, fallback_prompt


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings + ``layers`` + norm) inside a causal or image-text-to-text model."""
    inner = getattr(model, "model", None)
    candidates = [
        getattr(inner, "language_model", None),
        getattr(model, "language_model", None),
        getattr(getattr(inner, "text_model", None), "model", None),
        getattr(inner, "text_model", None),
        inner,
        getattr(model, "transformer", None),
    ]
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise UserError(
        f"{type(model).__name__}: no decoder stack with a `layers` list found "
        "(looked at model.model.language_model, model.language_model, model.model)"
    )


def text_inputs(tokenizer, text: str, device: torch.device) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    ids, spans = tokenize_with_spans(tokenizer, text)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, spans


def answer_ids_after(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` when it follows ``prompt`` (separator from ``answer_separator``)."""
    start = len(prompt) + len(answer_separator(prompt))
    ids, spans = tokenize_with_spans(tokenizer, prompt + answer_separator(prompt) + answer)
    return [ids[i] for i in positions_overlapping(spans, start, start + len(answer))]


class TextLMAdapter(ModelAdapter):
    family = "text"
    is_multimodal = False

    def layers(self) -> list[nn.Module]:
        return list(self.language_model().layers)

    def language_model(self) -> nn.Module:
        return find_decoder(self.model)

    def text_only(self) -> ModelAdapter:
        return self

    def _chat_renderer(self):
        """Who renders the chat template (None: use the fallback prompt)."""
        return self.tokenizer if getattr(self.tokenizer, "chat_template", None) else None

    def build_prompt(self, question: str, with_image: bool = False) -> tuple[str, int]:
        if with_image:
            raise UserError(f"{self.name_or_path} is a text-only model: it cannot take an image")
        renderer = self._chat_renderer()
        if renderer is None:
            return fallback_prompt(question, with_image=False)
        return chat_template_prompt(renderer, question, with_image=False, string_content=renderer is self.tokenizer)

    def encode(self, question: str, image=None, answer: str | None = None) -> Encoded:
        if image is not None:
            raise UserError(f"{self.name_or_path}: the text-only model was given an image")
        prompt, question_start = self.build_prompt(question, with_image=False)
        text, answer_start = prompt, None
        if answer is not None:
            answer_start = len(prompt) + len(answer_separator(prompt))
            text = prompt + answer_separator(prompt) + answer
        inputs, spans = text_inputs(self.tokenizer, text, self.device)
        answer_positions = [] if answer is None else positions_overlapping(spans, answer_start, len(text))
        return Encoded(
            inputs=inputs,
            prompt=prompt,
            question_start=question_start,
            token_char_spans=spans,
            text=text,
            answer_start=answer_start,
            answer_positions=answer_positions,
        )

    def answer_token_ids(self, answer: str) -> list[int]:
        prompt, _ = self.build_prompt("?", with_image=False)
        return answer_ids_after(self.tokenizer, prompt, answer)


class TextOnlyView(TextLMAdapter):
    """A multimodal model's language model on text prompts: same weights, ``input_ids`` only."""

    def __init__(self, parent: ModelAdapter):
        super().__init__(parent.model, parent.processor, parent.tokenizer, parent.name_or_path, parent.revision)
        self.parent = parent
        self.family = f"{parent.family}-text"

    def layers(self) -> list[nn.Module]:
        return self.parent.layers()

    def language_model(self) -> nn.Module:
        return self.parent.language_model()

    def mlp(self, layer: int) -> nn.Module:
        return self.parent.mlp(layer)

    def attention(self, layer: int) -> nn.Module:
        return self.parent.attention(layer)

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        return self.parent.mlp_out_proj(layer)

    def _chat_renderer(self):
        # The processor's multimodal template, rendered without an image entry.
        return self.processor if getattr(self.processor, "chat_template", None) else None

"""The shared image-text-to-text adapter: prompt, processor call, expanded positions.

Family modules (llava.py, llava_next.py, qwen2_vl.py, idefics3.py) subclass
``VisionLanguageAdapter`` and say only what differs: the image module, the
fallback prompt's image text, and any processor quirks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoProcessor

from vqa_constraints.errors import UserError

from .base import Encoded, ModelAdapter
from .encoding import adds_special_tokens, align_expanded, positions_overlapping, tokenize_with_spans
from .prompting import IMAGE_PLACEHOLDER, answer_separator, chat_template_prompt, fallback_prompt
from .text_lm import TextOnlyView, answer_ids_after, find_decoder


class ImageTextParts:
    """A processor assembled from its parts, for families whose processor class cannot be built here.

    Qwen2-VL's processor insists on a video processor, which needs
    torchvision; without it, the image processor and tokenizer (whose chat
    template is the processor's) are loaded separately and the family
    adapter expands the image placeholder itself.
    """

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, **kwargs)


class VisionLanguageAdapter(ModelAdapter):
    family = "vision-language"
    is_multimodal = True
    # What harness/models/registry.py serves with this adapter: transformers model class names (a checkpoint's
    # ``config.architectures[0]``) and the ``model_type`` of a config saved without ``architectures``.
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    @classmethod
    def load_processor(cls, name: str, **options):
        """The family's processor for checkpoint ``name`` (``AutoProcessor`` unless a family says otherwise)."""

        return AutoProcessor.from_pretrained(name, **options)

    # --- where the parts are ------------------------------------------------
    def layers(self) -> list[nn.Module]:
        return list(self.language_model().layers)

    def language_model(self) -> nn.Module:
        return find_decoder(self.model)

    def image_features_module(self) -> nn.Module | None:
        """Default: the multimodal projector (LLaVA and kin), whose output is the projected image features."""
        inner = getattr(self.model, "model", self.model)
        return getattr(inner, "multi_modal_projector", None)

    def text_only(self) -> ModelAdapter:
        return TextOnlyView(self)

    # --- image token --------------------------------------------------------
    @property
    def image_token(self) -> str:
        token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        return token or IMAGE_PLACEHOLDER

    @property
    def image_token_id(self) -> int:
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        return int(token_id)

    def fallback_image_text(self) -> str:
        """What stands for the image in the fallback prompt (the processor expands it)."""
        return self.image_token

    # --- prompts and inputs -------------------------------------------------
    def build_prompt(self, question: str, with_image: bool = True) -> tuple[str, int]:
        if getattr(self.processor, "chat_template", None):
            return chat_template_prompt(self.processor, question, with_image=with_image)
        prompt, start = fallback_prompt(question, with_image=with_image)
        image_text = self.fallback_image_text()
        if with_image and image_text != IMAGE_PLACEHOLDER:
            head = prompt[:start].replace(IMAGE_PLACEHOLDER, image_text)
            prompt, start = head + prompt[start:], len(head)
        return prompt, start

    def process(self, text: str, image) -> dict[str, torch.Tensor]:
        """The processor's model inputs for one text + image (batch of one)."""
        special = adds_special_tokens(self.tokenizer, text)
        return dict(self.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=special))

    def encode(self, question: str, image=None, answer: str | None = None) -> Encoded:
        if image is None:
            raise UserError(
                f"{self.name_or_path}: encode() needs an image for a multimodal model; use adapter.text_only() for text prompts"
            )
        prompt, question_start = self.build_prompt(question, with_image=True)
        text, answer_start = prompt, None
        if answer is not None:
            answer_start = len(prompt) + len(answer_separator(prompt))
            text = prompt + answer_separator(prompt) + answer
        inputs = self.process(text, _rgb(image))
        expanded = inputs["input_ids"][0].tolist()
        ids, spans = tokenize_with_spans(self.tokenizer, text)
        spans = align_expanded(expanded, ids, spans, self.image_token_id)
        image_id = self.image_token_id
        return Encoded(
            inputs=self._to_model(inputs),
            prompt=prompt,
            question_start=question_start,
            token_char_spans=spans,
            image_positions=[i for i, t in enumerate(expanded) if t == image_id],
            text=text,
            answer_start=answer_start,
            answer_positions=[] if answer is None else positions_overlapping(spans, answer_start, len(text)),
        )

    def answer_token_ids(self, answer: str) -> list[int]:
        prompt, _ = self.build_prompt("?", with_image=True)
        return answer_ids_after(self.tokenizer, prompt, answer)

    def _to_model(self, inputs: dict) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            out[key] = value
        return out


def _rgb(image):
    """PIL images in RGB (greyscale or RGBA flags would otherwise change the channel count)."""
    convert = getattr(image, "convert", None)
    if convert is not None and getattr(image, "mode", "RGB") != "RGB":
        return convert("RGB")
    return image

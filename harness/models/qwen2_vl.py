"""Qwen2-VL (``Qwen2VLForConditionalGeneration``).

Images become ``<|vision_start|><|image_pad|>…<|vision_end|>`` with one
``<|image_pad|>`` per 2x2-merged patch, so the count follows the image size.
Positions use multimodal RoPE, which the model computes from ``input_ids``,
``mm_token_type_ids``, ``image_grid_thw`` and the attention mask (left
padding is fine). The vision tower's patch merger outputs the image features.

``Qwen2VLProcessor`` needs a video processor and so torchvision; without
torchvision the image processor and tokenizer are used directly and the
placeholder is expanded here exactly as the processor would.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from .encoding import adds_special_tokens
from .multimodal import ImageTextParts, VisionLanguageAdapter

TEXT, IMAGE = 0, 1  # mm_token_type_ids values (transformers' convention)


class Qwen2VLAdapter(VisionLanguageAdapter):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)

    @classmethod
    def load_processor(cls, name: str, **options):
        if is_torchvision_available():
            processor = super().load_processor(name, **options)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                return processor
        return ImageTextParts(AutoImageProcessor.from_pretrained(name, **options), AutoTokenizer.from_pretrained(name, **options))

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"

    def fallback_image_text(self) -> str:
        return "<|vision_start|>" + self.image_token + "<|vision_end|>"

    def image_features_module(self) -> nn.Module | None:
        visual = getattr(getattr(self.model, "model", self.model), "visual", None)
        return getattr(visual, "merger", None)

    def process(self, text: str, image) -> dict[str, torch.Tensor]:
        if not isinstance(self.processor, ImageTextParts):
            return super().process(text, image)
        image_processor = self.processor.image_processor
        pixels = dict(image_processor(images=[image], return_tensors="pt"))
        count = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
        if text.count(self.image_token) != 1:
            raise ValueError(f"expected one {self.image_token} in the prompt, found {text.count(self.image_token)}")
        expanded = text.replace(self.image_token, self.image_token * count)
        special = adds_special_tokens(self.tokenizer, expanded)
        ids = self.tokenizer(expanded, add_special_tokens=special, return_tensors="pt")["input_ids"]
        types = torch.where(ids == self.image_token_id, IMAGE, TEXT)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types, **pixels}

"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, llava-v1.6).

The image is tiled by ``image_grid_pinpoints``: ``<image>`` expands to the
base view's features plus the unpadded tiles' features with a newline row
each, so the count depends on the image size (the processor computes it).
The projector's output is the projected image features; it has more rows
than image positions (unpadding and newlines happen after it).
"""

from __future__ import annotations

from .multimodal import VisionLanguageAdapter


class LlavaNextAdapter(VisionLanguageAdapter):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)

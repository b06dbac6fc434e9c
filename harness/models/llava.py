"""LLaVA (``LlavaForConditionalGeneration``): llava-1.5, the planted model, flag-llava.

``<image>`` expands to one token per projected patch feature (576 for
llava-1.5 at 336 px with the "default" strategy, which drops CLS); the
projector's output is what image-noise corruption perturbs.
"""

from __future__ import annotations

from .multimodal import VisionLanguageAdapter


class LlavaAdapter(VisionLanguageAdapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

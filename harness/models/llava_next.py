"""LlavaNextAdapter (work in progress)."""

from __future__ import annotations

from .multimodal import VisionLanguageAdapter


class LlavaNextAdapter(VisionLanguageAdapter):
    family = "llava_next"

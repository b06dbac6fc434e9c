"""Idefics3 (``Idefics3ForConditionalGeneration``; SmolVLM shares the layout).

``<image>`` becomes ``<fake_token_around_image><global-img>`` + one
``<image>`` per connector output + ``<fake_token_around_image>`` (plus one
such block per tile when the processor splits large images). The marker
tokens carry no characters of the prompt; the connector's output is the
projected image features.
"""

from __future__ import annotations

from torch import nn

from .multimodal import VisionLanguageAdapter


class Idefics3Adapter(VisionLanguageAdapter):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    model_types = ("idefics3",)

    def image_features_module(self) -> nn.Module | None:
        return getattr(getattr(self.model, "model", self.model), "connector", None)

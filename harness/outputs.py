"""What makes a command's output safe to trust and safe to replace.

- The documents of long runs (trace_stats.json, attention_stats.json,
  editing_results.json) carry ``"complete": true`` only when the run finished;
  an interrupted run writes what it has with ``"complete": false``. Every
  reader goes through ``read_complete`` / ``require_complete``.
- Folders written whole (``edit --save``, ``zoo build --out``) are assembled in
  a temporary sibling, marked with ``MARKER`` naming the command, and renamed
  into place. ``check_output_folder`` refuses a folder that would lose
  someone's files: a non-empty one that is not an earlier output of the same
  command (unless ``overwrite``), and, always, one that is or holds a
  protected path (the model, the working directory, the home folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from vqa_constraints.errors import UserError

MARKER = ".vqa-constraints-output"


# --- complete / partial documents ---------------------------------------------------


def require_complete(document: dict, path: str | Path) -> dict:
    """``document`` itself, or UserError when it is not marked ``"complete": true``."""
    if document.get("complete") is not True:
        if document.get("complete") is False:
            why = "holds partial results (complete: false) of an interrupted run"
        else:
            why = "has no \"complete\": true mark (an interrupted run, or one made by an older version)"
        raise UserError(f"{path} {why}; rerun the command that wrote it")
    return document


def read_complete(path: str | Path) -> dict:
    """Read a JSON output document and require it to be complete."""
    from harness.runs import read_json

    return require_complete(read_json(Path(path)), path)


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a readable JSON document marked complete (for reuse decisions)."""
    try:
        read_complete(path)
    except UserError:
        return False
    return True


def interrupted(path: str | Path) -> KeyboardInterrupt:
    """The interrupt to re-raise once partial results are on disk; the CLI prints its message."""
    return KeyboardInterrupt(f"wrote partial results (complete: false) to {path}; rerun the same command to redo it")


# --- whole output folders -----------------------------------------------------------


def marked_command(folder: Path) -> str | None:
    """The command named by ``folder``'s marker, or None when there is no readable marker."""
    try:
        return json.loads((Path(folder) / MARKER).read_text("utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_folder(target: str | Path, option: str, command: str, overwrite: bool = False,
                        protected: Iterable[tuple[str | Path, str]] = ()) -> Path:
    """Refuse ``target`` (given as ``option``) when writing ``command``'s output there could lose files.

    ``protected`` is (path, what) pairs, e.g. (model folder, "the model's folder"): the target may
    not be one of them, hold one, or lie inside one. The working directory and the home folder are
    always protected this way (inside them is fine). ``overwrite`` allows replacing a non-empty
    folder that is not an earlier output of ``command``, never a protected one.
    """
    target = Path(target)
    resolved = target.resolve()
    for path, what in protected:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents or path in resolved.parents:
            raise UserError(f"{option} {target}: is, holds or lies inside {what} ({path}); choose another folder")
    for path, what in ((Path.cwd().resolve(), "the working directory"), (Path.home().resolve(), "your home folder")):
        if resolved == path or resolved in path.parents:
            raise UserError(f"{option} {target}: is or holds {what}; choose another folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{option} {target}: exists and is not a folder; choose another")
    if target.exists() and any(target.iterdir()) and marked_command(target) != command and not overwrite:
        raise UserError(f"{option} {target}: folder is not empty and was not written by `{command}`; "
                        "choose another folder or pass --overwrite to replace it")
    return target


def staging_folder(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to assemble the output in (same file system, so rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def replace_folder(staging: Path, target: Path, command: str) -> Path:
    """Mark ``staging`` as ``command``'s output and rename it to ``target``.

    An older ``target`` is moved aside first and deleted only once the new one is in place.
    """
    (staging / MARKER).write_text(json.dumps({"command": command}) + "\n", "utf-8")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)
    return target

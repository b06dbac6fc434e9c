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
from collections.abc import Iterable
from pathlib import Path

from harness.runs import read_json, write_json_atomic
from vqa_constraints import files
from vqa_constraints.errors import UserError

MARKER = ".vqa-constraints-output"
# The document each command writes into its --out: a folder holding it is an earlier output of that command.
OUTPUT_DOCUMENTS = {"evaluate": "run.json", "trace": "trace_stats.json", "attention": "attention_stats.json",
                    "edit": "editing_results.json"}
# Files a command writes before its document: a run killed between the two (SIGKILL) left a folder that is
# still its own, and the rerun must be allowed to redo it.
EARLIER_FILES = {"evaluate": ("samples.jsonl",), "trace": ("traces.parquet",),
                 "attention": ("attention_examples.parquet",)}


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


def is_leftover(name: str) -> bool:
    """A temporary file of an atomic write (``.x.json.tmp``, ``x.tmp.png``) that a SIGKILL left behind."""
    return name.endswith(".tmp") or ".tmp." in name


def check_output_folder(target: str | Path, option: str, command: str, overwrite: bool = False,
                        protected: Iterable[tuple[str | Path, str]] = (), document: str | None = None,
                        earlier_files: Iterable[str] = ()) -> Path:
    """Refuse ``target`` (given as ``option``) when writing ``command``'s output there could lose files.

    ``protected`` is (path, what) pairs, e.g. (model folder, "the model's folder"): the target may
    not be one of them, hold one, or lie inside one. The working directory and the home folder are
    always protected this way (inside them is fine), and so is the zoo cache (inside it too). ``overwrite``
    allows replacing a non-empty folder that is not an earlier output of ``command``, never a protected
    one. An earlier output is marked with ``MARKER`` or holds ``document`` (or one of ``earlier_files``, which
    the command writes just before it); leftover temporary files
    of a killed run do not make a folder non-empty.
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
    cache = cache_root().resolve()
    if resolved == cache or resolved in cache.parents or cache in resolved.parents:
        raise UserError(f"{option} {target}: is, holds or lies inside the zoo cache ({cache}); choose another folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{option} {target}: exists and is not a folder; choose another")
    own = marked_command(target) == command or any(
        (target / name).is_file() for name in ([document] if document else []) + list(earlier_files))
    if target.exists() and any(not is_leftover(p.name) for p in target.iterdir()) and not own and not overwrite:
        raise UserError(f"{option} {target}: folder is not empty and was not written by `{command}`; "
                        "choose another folder or pass --overwrite to replace it")
    return target


def check_out(target: str | Path, command: str, model: str | Path | None = None,
              data: str | Path | None = None, also: Iterable[tuple[str | Path, str]] = ()) -> Path:
    """The one rule for ``--out`` of evaluate, trace, attention and edit, checked before any work.

    Refused: the model's folder, the data build, the zoo cache (or a folder holding or inside one of them),
    the working directory, the home folder, a file, and a non-empty folder that is not an earlier output
    of ``command``. Leftover ``*.tmp`` files of a killed earlier run are removed.
    """
    protected = [(path, what) for path, what in ((model, "the model's folder"), (data, "the data build"))
                 if path is not None and Path(str(path)).exists()]
    target = check_output_folder(target, "--out", command, False, [*protected, *also], OUTPUT_DOCUMENTS.get(command),
                                  EARLIER_FILES.get(command, ()))
    if target.is_dir():
        for leftover in target.iterdir():
            if is_leftover(leftover.name) and leftover.is_file():
                leftover.unlink()
    return target


class StaleDocuments:
    """On Ctrl-C before a command wrote its own document, an older run's complete document in ``--out``
    is marked ``"complete": false``, so it never passes for this command line's finished result."""

    def __init__(self, out: str | Path, command: str):
        self.path = Path(out) / OUTPUT_DOCUMENTS[command]
        self.before = self._stamp()

    def _stamp(self):
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if kind is None or not issubclass(kind, KeyboardInterrupt) or self.before is None:
            return False
        if self._stamp() != self.before:  # the command wrote its own (partial) document
            return False
        try:
            document = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            return False
        if isinstance(document, dict) and document.get("complete") is True:
            document["complete"] = False
            write_json_atomic(self.path, document)
            raise KeyboardInterrupt(f"stopped before any result; marked the earlier {self.path} complete: false "
                                    "(it is not this command's); rerun the same command") from None
        return False


def staged_folder(target: Path, command: str | None = None):
    """``vqa_constraints.files.staged_folder``, the finished folder marked as ``command``'s output when given
    (``MARKER``: what lets a later run of the same command reuse or replace it)."""

    def mark(staging: Path) -> None:
        (staging / MARKER).write_text(json.dumps({"command": command}) + "\n", "utf-8")

    return files.staged_folder(target, mark if command is not None else None)


# --- the project's cache (zoo models, key statistics): protected from every --out ----------

CACHE_ENV = "VQA_CONSTRAINTS_CACHE"


def cache_root() -> Path:
    """``$VQA_CONSTRAINTS_CACHE``, else ``$XDG_CACHE_HOME/vqa-constraints``, else ``~/.cache/vqa-constraints``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vqa-constraints"

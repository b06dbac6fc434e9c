"""Sources: one module per source, each turning its raw inputs into records, and the registry
`vqa-constraints build --sources NAME` reads.

A source is a function ``build_records(context) -> Iterable[Record]``: ``context`` (builder.SourceContext) gives
the seed, the files given with ``--source-path NAME[.KEY]=PATH`` and ``reject`` for a bad row. The builder checks
every record with the same rules as `validate`. A new source: ``register_source`` (docs/extending.md).
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

# name -> the module holding its ``build_records`` (imported only when built: some need optional packages), or
# the function itself for a source registered from code.
SOURCES: dict[str, str | Callable[..., Iterable]] = {
    "flags": "vqa_constraints.sources.flag_questions",
    "planted": "vqa_constraints.sources.planted",
    "mllminterpret-known": "vqa_constraints.sources.mllminterpret_known",
    "mllminterpret-movies": "vqa_constraints.sources.mllminterpret_movies",
    "okvqa": "vqa_constraints.sources.okvqa",
    "encyclopedic-vqa": "vqa_constraints.sources.encyclopedic_vqa",
}


def register_source(name: str, build_records: Callable[..., Iterable]) -> None:
    """Make ``build_records(context)`` available as `build --sources NAME`."""
    if name in SOURCES and SOURCES[name] is not build_records:
        raise ValueError(f"source {name!r} is already registered")
    SOURCES[name] = build_records


def records_builder(name: str) -> Callable[..., Iterable]:
    """The ``build_records`` of source ``name`` (its module imported on first use)."""
    entry = SOURCES[name]
    return importlib.import_module(entry).build_records if isinstance(entry, str) else entry

"""What the harness's commands share on the way from flags to options: ``--shard``'s type, and one helper that
fills an options dataclass from the parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses

from harness.shards import parse_shard
from vqa_constraints.errors import UserError


def shard(text: str) -> str:
    """``type=`` for --shard I/N (evaluate, trace, attention): a malformed shard is a usage error, "" included."""
    try:
        if parse_shard(text) is None:  # parse_shard reads "" as "not sharded"
            raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    except UserError as error:  # the parser puts the flag back in front
        raise argparse.ArgumentTypeError(str(error).removeprefix("--shard ")) from None
    return text


def options_from_args(cls, args: argparse.Namespace, **values):
    """``cls(...)`` with each field taken from the argument of the same name; ``values`` give the fields whose flag
    differs (``progress=not args.no_progress``). Fields without a flag or a value keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls) if f.init} - set(values)
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **values)

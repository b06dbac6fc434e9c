"""What the harness's commands share on the way from flags to options: the model options, ``--shard``'s type,
and one helper that fills an options dataclass from the parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses

from harness.models.options import DEFAULT_MAX_PIXELS, DEVICE_MAPS
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


def add_model_arguments(parser, required: bool = True) -> None:
    """The model options every command shares: --model --dtype --device --device-map --max-pixels --revision
    --trust-remote-code."""
    parser.add_argument("--model", required=required, help="local model folder or Hub id")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                        help="spread a model that does not fit one GPU over all visible GPUs (accelerate); overrides --device")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help=f"pixel budget per image for dynamic-resolution models (Qwen2-VL; default {DEFAULT_MAX_PIXELS} "
                        "= 1280 image tokens, or the checkpoint's own budget when smaller)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off by default)")


def model_options(args) -> dict:
    """The ``load_model`` keyword arguments from the options ``add_model_arguments`` defined."""
    return {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code,
            "revision": args.revision, "device_map": getattr(args, "device_map", None),
            "max_pixels": getattr(args, "max_pixels", None)}


def load_from_args(args):
    """``load_model`` with the options ``add_model_arguments`` defined."""
    from harness.models.loading import load_model  # transformers loads when a model does, not with the parser

    return load_model(args.model, **model_options(args))

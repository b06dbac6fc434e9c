"""`vqa-constraints zoo build planted|flag-llava --out DIR`."""

from __future__ import annotations

import argparse
import importlib

# zoo name -> module with ``build_cli(args) -> Path`` and ``add_arguments(parser)``
ZOO = {
    "planted": "harness.zoo.planted",
    "flag-llava": "harness.zoo.flag_llava",
}


def add_zoo(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="build the project's own small models")
    zoo_sub = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    build = zoo_sub.add_parser("build", help="build (or reuse from cache) a zoo model")
    build.add_argument("name", choices=sorted(ZOO))
    build.add_argument("--out", required=False, help="copy the finished model here (default: print the cache path)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="a reduced recipe (for tests and smoke runs)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds this recipe")
    build.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    module = importlib.import_module(ZOO[args.name])
    path = module.build_cli(args)
    print(path)
    return 0

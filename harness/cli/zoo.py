"""`vqa-constraints zoo build planted|flag-llava|flag-llava-stage1|flag-llava-direct --out DIR`."""

from __future__ import annotations

import argparse
import importlib

from vqa_constraints.cli import output_folder

# zoo name -> module with ``build_cli(args) -> Path`` and ``add_arguments(parser)``
ZOO = {
    "planted": "harness.zoo.planted",
    "planted-routed": "harness.zoo.planted.routed",  # attention controls (finding 2 positive)
    "flag-llava": "harness.zoo.flag_llava",  # stage 1 + visual instruction tuning (the default)
    "flag-llava-stage1": "harness.zoo.flag_llava",  # the earlier recipe: stage 1 only
    "flag-llava-direct": "harness.zoo.flag_llava",  # stage 2 with bare answers + replay
}


def add_zoo(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="build the project's own small models")
    zoo_sub = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    build = zoo_sub.add_parser("build", help="build (or reuse from cache) a zoo model")
    build.add_argument("name", choices=sorted(ZOO))
    build.add_argument("--out", required=False, type=output_folder,
                       help="copy the finished model here (default: print the cache path)")
    build.add_argument("--seed", type=int, default=0,
                       help="planted: world and training; flag-llava, flag-llava-direct: stage 2 only (held-out "
                       "countries, question order), on the shared stage-1 model; flag-llava-stage1: stage 1")
    build.add_argument("--quick", action="store_true", help="a reduced recipe (for tests and smoke runs)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache holds this recipe")
    build.add_argument("--overwrite", action="store_true",
                       help="let --out replace a non-empty folder that is not an earlier --out copy (never the "
                            "cache, the working directory or the home folder)")
    build.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from harness.zoo.cache import check_export_target, export

    module = importlib.import_module(ZOO[args.name])
    if args.out:
        check_export_target(args.out, args.overwrite)  # before a build that can take an hour
    path = module.build_cli(argparse.Namespace(**{**vars(args), "out": None}))  # build into the cache only
    if args.out:
        path = export(path, args.out, args.overwrite)
    print(path)
    return 0

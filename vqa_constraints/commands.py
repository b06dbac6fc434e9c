"""The dataset subcommands: build, validate, publish, info (registered in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

from vqa_constraints.cli import output_folder
from vqa_constraints.errors import UserError


def add_build(subparsers) -> None:
    from vqa_constraints.builder import DEFAULT_SOURCES, SOURCES

    parser = subparsers.add_parser(
        "build",
        help="build the dataset folder (Hugging Face Hub layout)",
        description="Build VQA-Constraints as README.md + <config>/<split>-*.parquet, loadable with datasets.load_dataset.",
    )
    parser.add_argument("--out", required=True, type=output_folder,
                        help="output folder (replaced atomically if it holds a build)")
    parser.add_argument(
        "--sources",
        help=f"comma-separated sources (default: {','.join(DEFAULT_SOURCES)} plus every source given a --source-path; "
        f"the synthetic 'planted' world only when named, and never in a leaderboard release); known: {', '.join(SOURCES)}",
    )
    parser.add_argument(
        "--source-path",
        action="append",
        default=[],
        metavar="NAME[.KEY]=PATH",
        help="input files of a user-supplied source, e.g. okvqa=OpenEnded_mscoco_val2014_questions.json "
        "okvqa.annotations=mscoco_val2014_annotations.json okvqa.images=val2014/ (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted world (default 0)")
    parser.add_argument(
        "--skip-invalid", action="store_true", help="skip invalid rows (reported with reasons) instead of stopping"
    )
    parser.add_argument("--subjects", type=Path, metavar="FILE",
                        help="keep only questions about the subjects listed in FILE, one per line (e.g. a model's "
                        "held-out countries); every listed subject must have questions")
    parser.set_defaults(func=run_build)


def run_build(args) -> int:
    from vqa_constraints.builder import build

    sources = None if args.sources is None else args.sources.split(",")
    subjects = None if args.subjects is None else read_subjects(args.subjects)
    report = build(args.out, sources=sources, source_paths=args.source_path, seed=args.seed,
                   skip_invalid=args.skip_invalid, subjects=subjects)
    print(report.summary())
    return 0


def read_subjects(path: Path) -> list[str]:
    """Subject names, one per line (blank lines ignored)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--subjects {path}: cannot read it ({type(error).__name__})") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise UserError(f"--subjects {path}: no subject names in it (one per line)")
    return names


def add_validate(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate", help="check a built folder against the record schema and the dataset's rules"
    )
    parser.add_argument("dir", type=Path, help="a folder written by `vqa-constraints build`")
    parser.set_defaults(func=run_validate)


def run_validate(args) -> int:
    from vqa_constraints.validation import validate_folder

    if not args.dir.is_dir():
        raise UserError(f"{args.dir}: no such folder")
    violations = validate_folder(args.dir)
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} violation(s) in {args.dir}")
        raise UserError(f"{args.dir}: not a valid build, {len(violations)} violation(s) (listed above)")
    print(f"ok: {args.dir} is valid")
    return 0


def add_publish(subparsers) -> None:
    parser = subparsers.add_parser(
        "publish", help="validate a build and upload it to the Hugging Face Hub as a dataset repo"
    )
    parser.add_argument("dir", type=Path, help="a folder written by `vqa-constraints build`")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the dataset repo (created if missing)")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the files that would be uploaded")
    parser.set_defaults(func=run_publish)


def run_publish(args) -> int:
    from vqa_constraints.publish import check_publishable, publish

    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        raise UserError(f"--repo-id {args.repo_id!r}: expected ORG/NAME")
    if args.dry_run:
        files = check_publishable(args.dir)
        target = f"{args.repo_id}@{args.revision or 'main'}"
        print(f"dry run: would upload {len(files)} files from {args.dir} to dataset {target}")
        for name in files:
            print(name)
        return 0
    commit = publish(args.dir, args.repo_id, revision=args.revision, private=args.private)
    print(f"published {args.dir} to dataset {args.repo_id}: commit {commit.oid} ({commit.commit_url})")
    return 0


def add_info(subparsers) -> None:
    parser = subparsers.add_parser("info", help="configs, splits, row counts, sources and constraint types")
    parser.add_argument("data", help="a built folder or a Hub dataset repo id (ORG/NAME)")
    parser.add_argument("--revision", help="Hub revision (repo ids only)")
    parser.set_defaults(func=run_info)


def run_info(args) -> int:
    from rich.console import Console

    from vqa_constraints.info import local_folder, render_table, summarise

    folder = local_folder(args.data, args.revision)
    summaries, build_info = summarise(folder)
    title = f"VQA-Constraints: {args.data}"
    if build_info:
        title += f" (seed {build_info.get('seed')}, sources {', '.join(build_info.get('sources', []))})"
    Console().print(render_table(summaries, title))
    return 0

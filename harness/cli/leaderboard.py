"""`vqa-constraints leaderboard`: prepare, validate, build and release (the library is harness/leaderboard/).

    vqa-constraints leaderboard prepare RUN_DIR --model-name NAME --submitted-by WHO --out SUBMISSIONS_DIR
    vqa-constraints leaderboard prepare --from-lmms-eval SAMPLES... --data DIR --model M --model-name NAME ...
    vqa-constraints leaderboard validate SUBMISSION.json [--data DIR | --release release.json] [--rerun K]
    vqa-constraints leaderboard build SUBMISSIONS_DIR --out DIR
    vqa-constraints leaderboard release --data DIR --out release.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.leaderboard import DEFAULT_RELEASE
from vqa_constraints.cli import output_file, output_folder
from vqa_constraints.errors import UserError

# The library (harness/leaderboard/) loads inside each run function, when the command runs, so that building
# every command's parser stays light.


def _add_release_options(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="check against this build (folder or Hub id) instead of the shipped release")
    source.add_argument("--release", type=Path, help=f"release file (default: {DEFAULT_RELEASE})")


def _release_of(args: argparse.Namespace) -> dict:
    from harness.leaderboard.release import default_release, load_release, release_from_data

    if args.data:
        return release_from_data(args.data)
    return load_release(args.release) if args.release else default_release()


def add_leaderboard(subparsers) -> None:
    parser = subparsers.add_parser("leaderboard", help="validate submissions and build the leaderboard")
    sub = parser.add_subparsers(dest="leaderboard_command", metavar="LEADERBOARD_COMMAND", required=True)

    validate = sub.add_parser("validate", help="check submissions against the release (every sample line, every metric)")
    validate.add_argument("submissions", nargs="+", type=Path, metavar="SUBMISSION.json")
    _add_release_options(validate)
    validate.add_argument("--rerun", type=int, default=0, metavar="K",
                          help="also re-score K random questions with the submitted model (needs it and --rerun-data)")
    validate.add_argument("--rerun-seed", type=int, default=None, metavar="S",
                          help="repeat the --rerun sample of an earlier validation (printed there); default: a fresh "
                          "random seed every time, so a submitter cannot predict the questions")
    validate.add_argument("--rerun-data", help="the released build (folder or Hub id) to re-score from (default: --data)")
    validate.add_argument("--device", default="auto", help="device for --rerun (default auto)")
    validate.set_defaults(func=_run_validate)

    build = sub.add_parser("build", help="validate every submission, then write leaderboard.md and leaderboard.csv")
    build.add_argument("submissions_dir", type=Path, metavar="SUBMISSIONS_DIR")
    build.add_argument("--out", required=True, type=output_folder)
    _add_release_options(build)
    build.set_defaults(func=_run_build)

    prepare = sub.add_parser("prepare", help="turn a finished run folder (or an lmms-eval run's samples) into a submission")
    prepare.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR")
    prepare.add_argument("--from-lmms-eval", nargs="+", type=Path, metavar="SAMPLES",
                         help="instead of RUN_DIR: lmms-eval --log_samples files (or their folder) of the "
                         "vqa_constraints tasks; needs --data and --model")
    prepare.add_argument("--data", help="with --from-lmms-eval: the build the run scored (folder or Hub id)")
    prepare.add_argument("--split", default="test", help="with --from-lmms-eval: the split it scored (default test)")
    prepare.add_argument("--model", help="with --from-lmms-eval: the model it ran (folder or Hub id)")
    prepare.add_argument("--model-name", required=True)
    prepare.add_argument("--submitted-by", required=True)
    prepare.add_argument("--model-url", default="")
    prepare.add_argument("--notes", default="")
    prepare.add_argument("--command", default="", help="the exact command that made the run "
                         "(default: the evaluate command rebuilt from results.json)")
    prepare.add_argument("--out", required=True, type=output_folder, metavar="SUBMISSIONS_DIR")
    prepare.set_defaults(func=_run_prepare)

    release = sub.add_parser("release", help="write the release file (per-question hashes) of a real-world build")
    release.add_argument("--data", required=True)
    release.add_argument("--split", default="test")
    release.add_argument("--out", required=True, type=output_file)
    release.set_defaults(func=_run_release)


def _run_validate(args: argparse.Namespace) -> int:
    from harness.leaderboard.checks import (
        RERUN_SEED_BITS, new_rerun_seed, rerun_check, rerun_sample, validate_submission,
    )

    if args.rerun < 0:
        raise UserError(f"--rerun {args.rerun}: expected a number of questions >= 0")
    if args.rerun_seed is not None and not 0 <= args.rerun_seed < 2 ** RERUN_SEED_BITS:
        raise UserError(f"--rerun-seed {args.rerun_seed}: expected a whole number in 0..2**{RERUN_SEED_BITS}-1")
    if args.rerun_seed is not None and not args.rerun:
        raise UserError("--rerun-seed repeats the sample of --rerun K: pass --rerun too")
    rerun_data = args.rerun_data or args.data
    if args.rerun and not rerun_data:
        raise UserError("--rerun needs the released build: pass --rerun-data DIR (or --data DIR)")
    release = _release_of(args)
    failed = []
    for path in args.submissions:
        problems = validate_submission(path, release)
        rerun = ""
        if not problems and args.rerun:
            # Fresh for every submission and every validation: a submitter cannot know which lines to keep honest.
            seed = new_rerun_seed() if args.rerun_seed is None else args.rerun_seed
            chosen = rerun_sample(_sample_lines(path), args.rerun, seed)
            print(f"rerun {path}: --rerun {args.rerun} --rerun-seed {seed} re-scores {len(chosen)} question(s): "
                  + " ".join(s["id"] for s in chosen))
            problems = rerun_check(path, args.rerun, rerun_data, seed=seed, device=args.device)
            rerun = f" (and {len(chosen)} questions re-scored, --rerun-seed {seed})"
        if problems:
            failed.append(str(path))
            for problem in problems:
                print(f"FAIL {problem}")
        else:
            print(f"ok   {path}{rerun}")
    if failed:  # the problems are on stdout; the one error line says which submissions failed
        raise UserError(f"{', '.join(failed)}: not a valid submission (problems listed above)")
    return 0


def _sample_lines(path: Path) -> list[dict]:
    """The sample lines of a submission that passed ``validate_submission`` (so they parse)."""
    from harness.leaderboard.checks import samples_path_of
    from harness.runs import read_json

    samples_path, _ = samples_path_of(Path(path), read_json(Path(path)))
    return [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines()]


def _run_build(args: argparse.Namespace) -> int:
    from harness.leaderboard.render import build_leaderboard

    md_path, csv_path = build_leaderboard(args.submissions_dir, args.out, _release_of(args))
    print(md_path)
    print(csv_path)
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from harness.leaderboard.submission import prepare_submission

    if args.from_lmms_eval:
        from harness.leaderboard.from_lmms_eval import prepare_from_lmms_eval

        if args.run_dir or not args.data or not args.model:
            raise UserError("--from-lmms-eval takes no RUN_DIR and needs --data BUILD and --model MODEL")
        print(prepare_from_lmms_eval(args.from_lmms_eval, args.data, args.model, args.out, args.model_name,
                                     args.submitted_by, split=args.split, command=args.command,
                                     model_url=args.model_url, notes=args.notes))
        return 0
    if not args.run_dir:
        raise UserError("prepare needs RUN_DIR (or --from-lmms-eval SAMPLES)")
    print(prepare_submission(args.run_dir, args.out, args.model_name, args.submitted_by, command=args.command,
                             model_url=args.model_url, notes=args.notes))
    return 0


def _run_release(args: argparse.Namespace) -> int:
    from harness.leaderboard.release import release_from_data, write_release

    write_release(args.out, release_from_data(args.data, args.split))
    print(args.out)
    return 0

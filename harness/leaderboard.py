"""The leaderboard: submissions are results.json files of full runs; validate them, then build the tables.

    vqa-constraints leaderboard prepare RUN_DIR --model-name NAME --submitted-by WHO --out SUBMISSIONS_DIR
    vqa-constraints leaderboard validate SUBMISSION.json [--data DIR | --release release.json]
    vqa-constraints leaderboard build SUBMISSIONS_DIR --out DIR
    vqa-constraints leaderboard release --data DIR --out release.json

A release file records, per config of the released split, its fingerprint and
size, so a submission can be checked against the data it claims to score
without downloading that data.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from collections import Counter
from functools import lru_cache
from importlib import resources
from pathlib import Path

from vqa_constraints import CONFIGS
from vqa_constraints.errors import UserError

from harness.results import compute_metrics, metrics_close
from harness.runs import RESULTS_FILE, SAMPLES_FILE, read_json, write_json_atomic
from harness.scoring import answer_correct, exact_match

DEFAULT_RELEASE = Path("leaderboard") / "release.json"
SCHEMA_NAMES = ("samples", "results", "submission")


# --- schemas ------------------------------------------------------------------


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """One of the JSON Schemas shipped in ``harness/schemas``."""
    text = resources.files("harness").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def validator(name: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (load_schema(n)["$id"], Resource.from_contents(load_schema(n))) for n in SCHEMA_NAMES
    )
    return Draft202012Validator(load_schema(name), registry=registry)


def schema_errors(name: str, instance, where: str) -> list[str]:
    """Readable schema violations: ``where at path.to.field: message``."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    out = []
    for error in errors:
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"{where} at {path}: {error.message}")
    return out


# --- release ------------------------------------------------------------------


def release_from_data(data: str, split: str = "test", configs=None) -> dict:
    """Fingerprint and size of each config's ``split`` in a build (folder or Hub id)."""
    from harness.evaluate import default_configs
    from vqa_constraints.loading import load_split

    out = {"split": split, "configs": {}}
    for config in configs or default_configs(data):
        loaded = load_split(data, config, split)
        out["configs"][config] = {"fingerprint": loaded.fingerprint, "n": len(loaded)}
    return out


def load_release(path: Path) -> dict:
    release = read_json(path)
    if not isinstance(release.get("configs"), dict) or "split" not in release:
        raise UserError(f"{path}: not a release file (needs 'split' and 'configs')")
    return release


# --- validate -----------------------------------------------------------------


def validate_submission(path: Path, release: dict | None) -> list[str]:
    """Every problem found in one submission (empty when it is valid)."""
    path = Path(path)
    try:
        submission = read_json(path)
    except UserError as error:
        return [str(error)]
    problems = schema_errors("submission", submission, str(path))
    if problems:
        return problems
    options, dataset, metrics = submission["options"], submission["dataset"], submission["metrics"]
    if options.get("limit") is not None:
        problems.append(f"{path}: made with --limit {options['limit']}; the leaderboard takes full runs only")
    if options.get("shard") is not None:
        problems.append(f"{path}: a single shard ({options['shard']}); merge the shards first (vqa-constraints merge)")
    configs = dataset["configs"]
    for config in configs:
        if config not in metrics:
            problems.append(f"{path}: metrics for config {config!r} are missing")
        elif metrics[config]["n"] != dataset["sizes"].get(config):
            problems.append(
                f"{path}: config {config!r} scored {metrics[config]['n']} questions but the data has {dataset['sizes'].get(config)}"
            )
    if release is not None:
        problems.extend(_check_release(path, submission, release))
    samples_name = submission["submission"].get("samples")
    if samples_name:
        problems.extend(_check_samples(path, path.parent / samples_name, submission))
    return problems


def _check_release(path: Path, submission: dict, release: dict) -> list[str]:
    problems = []
    dataset = submission["dataset"]
    if dataset["split"] != release["split"]:
        problems.append(f"{path}: scored split {dataset['split']!r}; the release is {release['split']!r}")
    for config, expected in sorted(release["configs"].items()):
        if config not in dataset["configs"]:
            problems.append(f"{path}: config {config!r} of the release was not scored")
            continue
        if dataset["fingerprints"].get(config) != expected["fingerprint"]:
            problems.append(
                f"{path}: dataset fingerprint of {config!r} is {str(dataset['fingerprints'].get(config))[:12]}..., "
                f"the release has {expected['fingerprint'][:12]}... (scored other data)"
            )
        n = submission["metrics"].get(config, {}).get("n")
        if n != expected["n"]:
            problems.append(f"{path}: config {config!r} has n={n}; the release has {expected['n']} questions")
    return problems


def _check_samples(path: Path, samples_path: Path, submission: dict) -> list[str]:
    if not samples_path.is_file():
        return [f"{path}: submission.samples names {samples_path}, which does not exist"]
    problems, samples = [], []
    with open(samples_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{samples_path} line {number}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not valid JSON ({error.msg})")
                continue
            errors = schema_errors("samples", sample, where)
            if errors:
                problems.extend(errors[:3])
                continue
            if sample["prediction"] is not None:
                if sample["correct"] != answer_correct(sample["prediction"], sample["answers"]):
                    problems.append(f"{where}: 'correct' does not follow from prediction and answers")
                if sample["exact"] != exact_match(sample["prediction"], sample["answers"]):
                    problems.append(f"{where}: 'exact' does not follow from prediction and answers")
            samples.append(sample)
    if problems:
        return problems[:20]
    duplicates = [i for i, count in Counter(s["id"] for s in samples).items() if count > 1]
    if duplicates:
        return [f"{samples_path}: question {duplicates[0]} appears more than once"]
    recomputed = compute_metrics(samples, submission["dataset"]["configs"], submission["options"]["seed"])
    differences = metrics_close(recomputed, submission["metrics"])
    return [f"{path}: metrics do not match the attached samples: {d}" for d in differences[:10]]


# --- prepare ------------------------------------------------------------------


def prepare_submission(run_dir: Path, out_dir: Path, model_name: str, submitted_by: str, **extra) -> Path:
    """Turn a finished run into ``OUT/<slug>.json`` + ``OUT/<slug>.samples.jsonl``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    results = read_json(run_dir / RESULTS_FILE)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name).strip("-") or "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_target = out_dir / f"{slug}.samples.jsonl"
    staging = samples_target.with_name(f".{samples_target.name}.tmp")
    shutil.copyfile(run_dir / SAMPLES_FILE, staging)
    staging.replace(samples_target)
    results["submission"] = {"model_name": model_name, "submitted_by": submitted_by, "samples": samples_target.name}
    results["submission"].update({k: v for k, v in extra.items() if v})
    target = out_dir / f"{slug}.json"
    write_json_atomic(target, results)
    return target


# --- build --------------------------------------------------------------------


def _pct(stat: dict | None) -> str:
    return "" if not stat or stat.get("value") is None else f"{100 * stat['value']:.1f}"


def leaderboard_rows(submissions_dir: Path) -> list[dict]:
    """One row per submission, best overall accuracy first (ties by name)."""
    submissions_dir = Path(submissions_dir)
    if not submissions_dir.is_dir():
        raise UserError(f"{submissions_dir}: no such folder")
    rows = []
    for path in sorted(submissions_dir.glob("*.json")):
        submission = read_json(path)
        errors = schema_errors("submission", submission, str(path))
        if errors:
            raise UserError(f"{errors[0]} (run `vqa-constraints leaderboard validate {path}`)")
        metrics = submission["metrics"]
        by_type = metrics["all"]["by"]["constraint_types"]
        accuracy = metrics["all"].get("accuracy") or {}
        row = {
            "model": submission["submission"]["model_name"],
            "revision": (submission["model"].get("revision") or "")[:19],
            "accuracy": _pct(accuracy),
            "ci95": f"{_pct({'value': accuracy['ci_low']})}-{_pct({'value': accuracy['ci_high']})}" if accuracy else "",
            "exact_match": _pct(metrics["all"].get("exact_match")),
        }
        for config in CONFIGS:
            row[config] = _pct(metrics.get(config, {}).get("accuracy"))
        row["visual"] = _pct(by_type.get("visual", {}).get("accuracy"))
        row["visual+textual"] = _pct(by_type.get("visual+textual", {}).get("accuracy"))
        row["n"] = metrics["all"]["n"]
        row["submitted_by"] = submission["submission"]["submitted_by"]
        row["_sort"] = (-(accuracy.get("value") if accuracy.get("value") is not None else -1.0), row["model"])
        rows.append(row)
    if not rows:
        raise UserError(f"{submissions_dir}: no *.json submissions")
    rows.sort(key=lambda r: r["_sort"])
    for row in rows:
        del row["_sort"]
    return rows


def build_leaderboard(submissions_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    rows = leaderboard_rows(submissions_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = out_dir / "leaderboard.csv"
    _write_text_atomic(csv_path, buffer.getvalue())
    header = ["#"] + columns
    lines = [
        "# VQA-Constraints leaderboard",
        "",
        "Accuracy (%) on the test split: a normalised gold answer appears in the model's greedy answer. "
        "ci95 is a 95% bootstrap interval; visual / visual+textual split the questions by constraint type.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if c in ("#", "model", "revision", "submitted_by") else "---:" for c in header) + "|",
    ]
    for rank, row in enumerate(rows, start=1):
        lines.append("| " + " | ".join([str(rank)] + [str(row[c]).replace("|", "\\|") for c in columns]) + " |")
    md_path = out_dir / "leaderboard.md"
    _write_text_atomic(md_path, "\n".join(lines) + "\n")
    return md_path, csv_path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --- CLI ----------------------------------------------------------------------


def add_leaderboard(subparsers) -> None:
    parser = subparsers.add_parser("leaderboard", help="validate submissions and build the leaderboard")
    sub = parser.add_subparsers(dest="leaderboard_command", metavar="LEADERBOARD_COMMAND", required=True)

    validate = sub.add_parser("validate", help="check submissions (schema, data fingerprint, sizes, samples)")
    validate.add_argument("submissions", nargs="+", type=Path, metavar="SUBMISSION.json")
    source = validate.add_mutually_exclusive_group()
    source.add_argument("--data", help="check fingerprints against this build (folder or Hub id)")
    source.add_argument("--release", type=Path, help=f"release file with fingerprints and sizes (default: {DEFAULT_RELEASE} if present)")
    validate.set_defaults(func=_run_validate)

    build = sub.add_parser("build", help="write leaderboard.md and leaderboard.csv")
    build.add_argument("submissions_dir", type=Path, metavar="SUBMISSIONS_DIR")
    build.add_argument("--out", required=True, type=Path)
    build.set_defaults(func=_run_build)

    prepare = sub.add_parser("prepare", help="turn a finished run folder into a submission")
    prepare.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    prepare.add_argument("--model-name", required=True)
    prepare.add_argument("--submitted-by", required=True)
    prepare.add_argument("--model-url", default="")
    prepare.add_argument("--notes", default="")
    prepare.add_argument("--out", required=True, type=Path, metavar="SUBMISSIONS_DIR")
    prepare.set_defaults(func=_run_prepare)

    release = sub.add_parser("release", help="write the release file (fingerprints and sizes) of a build")
    release.add_argument("--data", required=True)
    release.add_argument("--split", default="test")
    release.add_argument("--out", required=True, type=Path)
    release.set_defaults(func=_run_release)


def _run_validate(args: argparse.Namespace) -> int:
    release = None
    if args.data:
        release = release_from_data(args.data)
    elif args.release:
        release = load_release(args.release)
    elif DEFAULT_RELEASE.exists():
        release = load_release(DEFAULT_RELEASE)
    else:
        print(f"note: no --data or --release and no {DEFAULT_RELEASE}; dataset fingerprints not checked")
    failed = 0
    for path in args.submissions:
        problems = validate_submission(path, release)
        if problems:
            failed += 1
            for problem in problems:
                print(f"FAIL {problem}")
        else:
            print(f"ok   {path}")
    return 1 if failed else 0


def _run_build(args: argparse.Namespace) -> int:
    md_path, csv_path = build_leaderboard(args.submissions_dir, args.out)
    print(md_path)
    print(csv_path)
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    print(prepare_submission(args.run_dir, args.out, args.model_name, args.submitted_by, model_url=args.model_url, notes=args.notes))
    return 0


def _run_release(args: argparse.Namespace) -> int:
    write_json_atomic(args.out, release_from_data(args.data, args.split))
    print(args.out)
    return 0

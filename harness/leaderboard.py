"""The leaderboard: submissions are results.json files of full runs; validate them, then build the tables.

    vqa-constraints leaderboard prepare RUN_DIR --model-name NAME --submitted-by WHO --out SUBMISSIONS_DIR
    vqa-constraints leaderboard prepare --from-lmms-eval SAMPLES... --data DIR --model M --model-name NAME ...
    vqa-constraints leaderboard validate SUBMISSION.json [--data DIR | --release release.json] [--rerun K]
    vqa-constraints leaderboard build SUBMISSIONS_DIR --out DIR
    vqa-constraints leaderboard release --data DIR --out release.json

The release file (harness/leaderboard_release.py) records every question of
the released split as hashes, so a submission's sample lines are checked one
by one against the data without shipping it; metrics are then recomputed from
those lines. ``--rerun K`` re-scores K of them with the submitted model, the
only check that catches predictions written by hand.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import random
import re
import secrets
import shlex
import shutil
import unicodedata
from functools import lru_cache
from pathlib import Path

from vqa_constraints import CONFIGS, files
from vqa_constraints.cli import output_file, output_folder
from vqa_constraints.errors import UserError

from harness.leaderboard_release import (
    DEFAULT_RELEASE,
    HASH_FIELDS,
    LABEL_FIELDS,
    default_release,
    load_release,
    question_hashes,
    release_from_data,
    synthetic_problem,
    write_release,
)
from harness.results import compute_metrics, metrics_close
from harness.runs import RESULTS_FILE, SAMPLES_FILE, read_json, write_json_atomic
from harness.scoring import answer_correct, exact_match

SCHEMA_NAMES = ("samples", "results", "submission")
MAX_PROBLEMS = 20  # per samples file: enough to see the pattern without flooding the terminal
MAX_NAME = 100  # characters of model_name / submitted_by: a leaderboard cell, not a document
RERUN_SEED_BITS = 63  # --rerun's seed: drawn with `secrets`, printed so a maintainer can repeat the draw


# --- schemas ------------------------------------------------------------------


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """One of the JSON Schemas shipped in ``harness/schemas``."""
    return files.load_schema("harness", "schemas", f"{name}.schema.json")


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


# --- validate -----------------------------------------------------------------


def validate_submission(path: Path, release: dict) -> list[str]:
    """Every problem found in one submission, one line each naming the field (empty when it is valid).

    Data checks only: they prove the numbers follow from the sample lines and the sample lines from
    the released questions, not that a model produced the predictions (see ``rerun_check``).
    """
    path = Path(path)
    if path.is_symlink():  # its samples would be looked up next to the link's target, outside the submissions
        return [f"{path}: a symbolic link; put the submission file itself in the folder"]
    try:
        submission = read_json(path)
    except UserError as error:
        return [str(error)]
    problems = schema_errors("submission", submission, str(path))
    if problems:
        return problems
    problems.extend(name_problems(submission["submission"], lambda field: f"{path} field 'submission.{field}'"))
    options, dataset, metrics = submission["options"], submission["dataset"], submission["metrics"]
    if options.get("limit") is not None:
        problems.append(f"{path} field 'options.limit': made with --limit {options['limit']}; the leaderboard takes full runs only")
    if options.get("shard") is not None:
        problems.append(f"{path} field 'options.shard': a single shard ({options['shard']}); merge the shards first (vqa-constraints merge)")
    synthetic = synthetic_problem(metrics["all"]["by"]["source"])
    if synthetic:
        problems.append(f"{path} field 'metrics.all.by.source': {synthetic}")
    for config in dataset["configs"]:
        if config not in metrics:
            problems.append(f"{path} field 'metrics.{config}': metrics for config {config!r} are missing")
        elif metrics[config]["n"] != dataset["sizes"].get(config):
            problems.append(
                f"{path} field 'metrics.{config}.n': scored {metrics[config]['n']} questions but the data has "
                f"{dataset['sizes'].get(config)}"
            )
    problems.extend(_check_release(path, submission, release))
    samples_path, problem = samples_path_of(path, submission)
    if problem:
        problems.append(problem)
    else:
        problems.extend(_check_samples(path, samples_path, submission, release))
    return problems


def name_problems(entry: dict, where_of) -> list[str]:
    """The names shown on the leaderboard: printable ASCII, not blank, at most ``MAX_NAME`` characters.

    ASCII only for ``model_name``: a look-alike letter from another script (Cyrillic 'а' for Latin 'a') would
    rank a second entry that reads exactly like an existing one. ``submitted_by`` may be any printable text.
    """
    problems = []
    for field, ascii_only in (("model_name", True), ("submitted_by", False)):
        name = entry[field]
        where = where_of(field)
        if len(name) > MAX_NAME:
            problems.append(f"{where}: {len(name)} characters; at most {MAX_NAME}")
        elif not name.strip():
            problems.append(f"{where}: blank (only whitespace)")
        elif not name.isprintable():
            problems.append(f"{where}: holds a control character or line break")
        elif ascii_only and not name.isascii():
            odd = next(c for c in name if not c.isascii())
            problems.append(f"{where}: {odd!r} (U+{ord(odd):04X}) is not ASCII; model names are plain ASCII so that "
                            "no entry can imitate another's name with look-alike letters")
        elif name != name.strip():
            problems.append(f"{where}: leading or trailing whitespace")
    return problems


def name_key(name: str) -> str:
    """Two model names that read alike (case, spacing, '-' vs '_') share this key."""
    return re.sub(r"[\s_\-]+", "-", unicodedata.normalize("NFKC", name).casefold()).strip("-")


def samples_path_of(path: Path, submission: dict) -> tuple[Path | None, str | None]:
    """The samples file, which must be a file inside the submission's own folder."""
    name = submission["submission"]["samples"]
    where = f"{path} field 'submission.samples'"
    if "\x00" in name or not name.isprintable():
        return None, f"{where}: {name!r} holds a NUL or control character; give the samples file's name"
    candidate = Path(name)
    folder = path.resolve().parent
    if candidate.is_absolute() or ".." in candidate.parts:
        return None, f"{where}: {name!r} must be a file name inside the submission's folder (no absolute path, no '..')"
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder):
        return None, f"{where}: {name!r} leads outside the submission's folder"
    if not resolved.is_file():
        return None, f"{where}: {path.parent / candidate} does not exist"
    return resolved, None


def _check_release(path: Path, submission: dict, release: dict) -> list[str]:
    problems = []
    dataset = submission["dataset"]
    if dataset["split"] != release["split"]:
        problems.append(f"{path} field 'dataset.split': scored split {dataset['split']!r}; the release is {release['split']!r}")
    for config in dataset["configs"]:
        if config not in release["configs"]:
            problems.append(f"{path} field 'dataset.configs': config {config!r} is not in the release")
    for config, expected in sorted(release["configs"].items()):
        if config not in dataset["configs"]:
            problems.append(f"{path} field 'dataset.configs': config {config!r} of the release was not scored")
            continue
        if dataset["fingerprints"].get(config) != expected["fingerprint"]:
            problems.append(
                f"{path} field 'dataset.fingerprints.{config}': {str(dataset['fingerprints'].get(config))[:12]}..., "
                f"the release has {expected['fingerprint'][:12]}... (scored other data)"
            )
        n = submission["metrics"].get(config, {}).get("n")
        if n != expected["n"]:
            problems.append(f"{path} field 'metrics.{config}.n': {n}; the release has {expected['n']} questions")
    return problems


def _check_samples(path: Path, samples_path: Path, submission: dict, release: dict) -> list[str]:
    expected = {qid: hashes for entry in release["configs"].values() for qid, hashes in entry["questions"].items()}
    scoring_mode = submission["options"]["scoring"]
    problems, samples, seen = [], [], set()
    lines = samples_path.read_bytes().splitlines(keepends=True)
    for number, raw in enumerate(lines, start=1):
        where = f"{samples_path} line {number}"
        try:
            sample = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            problems.append(f"{where}: not valid JSON (not UTF-8 text at byte {error.start})")
            continue
        except json.JSONDecodeError as error:
            problems.append(f"{where}: not valid JSON ({error.msg})")
            continue
        except RecursionError:
            problems.append(f"{where}: not valid JSON (nested too deeply)")
            continue
        errors = schema_errors("samples", sample, where)
        if errors:
            problems.extend(errors[:3])
            continue
        problems.extend(_sample_problems(where, sample, expected, seen, scoring_mode))
        seen.add(sample["id"])
        samples.append(sample)
    if not lines:
        return [f"{path} field 'submission.samples': {samples_path.name} holds no sample lines"]
    missing = [qid for qid in expected if qid not in seen]
    if missing:
        problems.append(f"{samples_path} field 'id': {len(missing)} question(s) of the release have no sample line (first: {missing[0]})")
    if problems:
        more = len(problems) - MAX_PROBLEMS
        return problems[:MAX_PROBLEMS] + ([f"{samples_path}: ... and {more} more problem(s)"] if more > 0 else [])
    recomputed = compute_metrics(samples, submission["dataset"]["configs"], submission["options"]["seed"])
    differences = metrics_close(recomputed, submission["metrics"])
    return [f"{path} field '{d.split(':')[0]}': does not match the attached samples ({d})" for d in differences[:10]]


def _sample_problems(where: str, sample: dict, expected: dict, seen: set, scoring_mode: str) -> list[str]:
    """What is wrong with one schema-valid sample line, judged against the release and the run's scoring mode."""
    qid = sample["id"]
    if qid in seen:
        return [f"{where} field 'id': question {qid} appears more than once"]
    if qid not in expected:
        return [f"{where} field 'id': {qid!r} is not a question of the release"]
    problems = []
    for field_name, got, wanted in zip(HASH_FIELDS, question_hashes(sample), expected[qid]):
        if got != wanted:
            named = field_name if field_name != "labels" else "/".join(LABEL_FIELDS)
            problems.append(f"{where} field '{named}': differs from the released question {qid}")
    prediction = sample["prediction"]
    generates = scoring_mode in ("generate", "both")
    if generates and prediction is None:
        problems.append(f"{where} field 'prediction': null, but scoring {scoring_mode!r} generates an answer for every question")
    if not generates and prediction is not None:
        problems.append(f"{where} field 'prediction': set, but scoring {scoring_mode!r} generates no answers")
    # Recomputed for every row, null included: a null prediction can only be null-correct.
    for field_name, match in (("correct", answer_correct), ("exact", exact_match)):
        wanted = None if prediction is None else match(prediction, sample["answers"])
        if sample[field_name] is not wanted:
            problems.append(f"{where} field '{field_name}': {sample[field_name]} does not follow from prediction and answers ({wanted})")
    logprobs = sample["answer_logprobs"]
    if (scoring_mode in ("logprob", "both")) != (logprobs is not None):
        problems.append(f"{where} field 'answer_logprobs': {'null' if logprobs is None else 'set'} under scoring {scoring_mode!r}")
    positive = [v for v in (logprobs or []) + [sample["gold_logprob"]] if v is not None and v > 0]
    if positive:  # a log-probability is at most 0: a probability is at most 1
        problems.append(f"{where} field 'answer_logprobs': {positive[0]} > 0 is not a log-probability")
    if logprobs is not None:
        if len(logprobs) != len(sample["answers"]):
            problems.append(f"{where} field 'answer_logprobs': {len(logprobs)} values for {len(sample['answers'])} answers")
        elif sample["gold_logprob"] is None or not math.isclose(sample["gold_logprob"], max(logprobs), abs_tol=1e-6):
            problems.append(f"{where} field 'gold_logprob': {sample['gold_logprob']} is not the best of answer_logprobs")
    elif sample["gold_logprob"] is not None:
        problems.append(f"{where} field 'gold_logprob': set without answer_logprobs")
    return problems


# --- prepare ------------------------------------------------------------------


def evaluate_command(results: dict) -> str:
    """The `vqa-constraints evaluate` command that reproduces a run, rebuilt from its results.json."""
    model, dataset, options = results["model"], results["dataset"], results["options"]
    argv = ["vqa-constraints", "evaluate", "--model", model["id"]]
    if model.get("revision") and not str(model["revision"]).startswith("sha256:"):
        argv += ["--revision", model["revision"]]  # a Hub commit; a local folder is pinned by its sha256 instead
    argv += ["--data", dataset["data"]]
    if dataset.get("revision"):
        argv += ["--data-revision", dataset["revision"]]
    argv += ["--split", dataset["split"]]
    for config in dataset["configs"]:
        argv += ["--config", config]
    argv += ["--scoring", options["scoring"], "--backend", options["backend"], "--batch-size", str(options["batch_size"]),
             "--max-new-tokens", str(options["max_new_tokens"]), "--seed", str(options["seed"]),
             "--dtype", model["dtype"]]
    if model.get("max_pixels"):
        argv += ["--max-pixels", str(model["max_pixels"])]
    if model.get("device_map"):
        argv += ["--device-map", str(model["device_map"])]
    argv += ["--out", "RUN_DIR"]
    return shlex.join(argv)


def prepare_submission(run_dir: Path, out_dir: Path, model_name: str, submitted_by: str, command: str = "", **extra) -> Path:
    """Turn a finished run into ``OUT/<slug>.json`` + ``OUT/<slug>.samples.jsonl``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    results = read_json(run_dir / RESULTS_FILE)
    problems = schema_errors("results", results, str(run_dir / RESULTS_FILE))
    if problems:
        raise UserError(problems[0])
    # What `validate` would refuse is refused here, before anything is written.
    options = results["options"]
    if options.get("limit") is not None:
        raise UserError(f"{run_dir}: made with --limit {options['limit']}; the leaderboard takes full runs only "
                        "(rerun evaluate without --limit)")
    if options.get("shard") is not None:
        raise UserError(f"{run_dir}: a single shard ({options['shard']}); merge the shards first (vqa-constraints merge)")
    if not (run_dir / SAMPLES_FILE).is_file():
        raise UserError(f"{run_dir}: no {SAMPLES_FILE} next to {RESULTS_FILE}; not a complete run folder")
    check_sample_file(run_dir / SAMPLES_FILE, results.get("n"))
    problems = name_problems({"model_name": model_name, "submitted_by": submitted_by},
                             lambda field: "--" + field.replace("_", "-"))
    if problems:
        raise UserError(problems[0])
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name).strip("-.") or "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_target = out_dir / f"{slug}.samples.jsonl"
    staging = samples_target.with_name(f".{samples_target.name}.tmp")
    shutil.copyfile(run_dir / SAMPLES_FILE, staging)
    staging.replace(samples_target)
    results["submission"] = {
        "model_name": model_name,
        "submitted_by": submitted_by,
        "samples": samples_target.name,
        # What a maintainer needs to re-run it: the data checks cannot tell a real prediction from a typed one.
        "reproduce": {
            "command": command or evaluate_command(results),
            "model_revision": results["model"].get("revision"),
            "package_version": results["package"]["version"],
            "git_commit": results["package"].get("git_commit"),
        },
    }
    results["submission"].update({k: v for k, v in extra.items() if v})
    target = out_dir / f"{slug}.json"
    write_json_atomic(target, results)
    return target


def check_sample_file(path: Path, expected: int | None) -> None:
    """UserError at the first line of a run's samples.jsonl that `validate` could not read, before anything is written."""
    lines = path.read_bytes().splitlines()
    for number, raw in enumerate(lines, start=1):
        where = f"{path} line {number}"
        try:
            sample = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise UserError(f"{where}: not valid JSON (not UTF-8 text at byte {error.start})") from None
        except (json.JSONDecodeError, RecursionError) as error:
            raise UserError(f"{where}: not valid JSON ({getattr(error, 'msg', 'nested too deeply')})") from None
        errors = schema_errors("samples", sample, where)
        if errors:
            raise UserError(errors[0])
    if expected is not None and len(lines) != expected:
        raise UserError(f"{path}: {len(lines)} sample lines, but results.json field 'n' says {expected}")


# --- re-run check -------------------------------------------------------------


def new_rerun_seed() -> int:
    """A fresh seed from the operating system: the submitter cannot know which questions will be re-run."""
    return secrets.randbits(RERUN_SEED_BITS)


def rerun_sample(samples: list[dict], count: int, seed: int) -> list[dict]:
    """The ``count`` sample lines that ``--rerun count --rerun-seed seed`` re-scores, in file order.

    Drawn by ``random.Random(seed).sample`` over the lines sorted by question id, so the same seed
    picks the same questions whatever order the submitter wrote them in.
    """
    ordered = sorted(samples, key=lambda s: str(s.get("id")))
    chosen = {id(s) for s in random.Random(seed).sample(ordered, min(count, len(ordered)))}
    return [s for s in samples if id(s) in chosen]


def rerun_check(path: Path, count: int, data: str, seed: int, device: str = "auto") -> list[str]:
    """Re-score ``count`` random questions (drawn with ``seed``) with the submission's model; compare the lines.

    The one check that catches predictions rewritten by hand: it needs the model (``model.id``, pinned by
    ``model.revision``) and the released data (``data``) on this machine. ``_run_validate`` draws ``seed``
    fresh for every validation unless ``--rerun-seed`` repeats an earlier one.
    """
    from harness.evaluate import EvalOptions, Task, load_adapter, make_backend, score_batch
    from vqa_constraints.loading import load_split

    path = Path(path)
    submission = read_json(path)
    samples_path, problem = samples_path_of(path, submission)
    if problem:
        return [problem]
    samples = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines()]
    chosen = rerun_sample(samples, count, seed)
    model, options = submission["model"], submission["options"]
    eval_options = EvalOptions(
        model=model["id"], data=data, out=Path("."), split=submission["dataset"]["split"], batch_size=8,
        scoring=options["scoring"], max_new_tokens=options["max_new_tokens"], dtype=model["dtype"], device=device,
        revision=None if str(model.get("revision") or "").startswith("sha256:") else model.get("revision"),
    )
    adapter = load_adapter(eval_options)
    if getattr(adapter, "revision", None) != model.get("revision"):
        return [f"{path} field 'model.revision': {model.get('revision')}, but {model['id']} is now {adapter.revision}"]
    backend = make_backend(eval_options, adapter)
    problems = []
    for config in sorted({s["config"] for s in chosen}):
        loaded = load_split(data, config, eval_options.split)
        index = {qid: i for i, qid in enumerate(loaded.rows.select_columns(["id"]).to_dict()["id"])}
        mine = [s for s in chosen if s["config"] == config]
        absent = [s["id"] for s in mine if s["id"] not in index]
        if absent:
            raise UserError(f"--rerun-data {data}: config {config!r} split {eval_options.split!r} has no question "
                            f"{absent[0]} ({len(absent)} of the sampled questions missing); pass the released build")
        records = [loaded.record(index[s["id"]]) for s in mine]
        tasks = [Task(config, index[s["id"]], s["id"]) for s in mine]
        for claimed, fresh in zip(mine, score_batch(backend, adapter, records, tasks, eval_options)):
            for field_name in ("prompt_hash", "prediction"):
                if claimed[field_name] != fresh[field_name]:
                    problems.append(
                        f"{samples_path} question {claimed['id']} field '{field_name}': {claimed[field_name]!r}, "
                        f"but re-running the model gives {fresh[field_name]!r}"
                    )
            if claimed["gold_logprob"] is not None and fresh["gold_logprob"] is not None and not math.isclose(
                claimed["gold_logprob"], fresh["gold_logprob"], abs_tol=1e-3
            ):
                problems.append(
                    f"{samples_path} question {claimed['id']} field 'gold_logprob': {claimed['gold_logprob']}, "
                    f"but re-running the model gives {fresh['gold_logprob']}"
                )
    return problems


# --- build --------------------------------------------------------------------

TEXT_COLUMNS = ("model", "revision", "submitted_by")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def one_line(text) -> str:
    """Control characters and line breaks become spaces: one field can never start a new row."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def markdown_cell(text) -> str:
    """Safe in a Markdown table rendered to HTML: no raw tags, no emphasis or links, no column breaks."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line(text), quote=True))


def csv_text(text) -> str:
    # A leading = + - @ makes spreadsheets run the cell as a formula.
    text = one_line(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def _pct(stat: dict | None) -> str:
    return "" if not stat or stat.get("value") is None else f"{100 * stat['value']:.1f}"


def leaderboard_rows(submissions_dir: Path, release: dict) -> list[dict]:
    """One row per submission, best overall accuracy first (ties by name); every entry validated first."""
    submissions_dir = Path(submissions_dir)
    if not submissions_dir.is_dir():
        raise UserError(f"{submissions_dir}: no such folder")
    rows, names = [], {}
    for path in sorted(submissions_dir.glob("*.json")):
        problems = validate_submission(path, release)
        if problems:
            raise UserError(f"{problems[0]} (run `vqa-constraints leaderboard validate {path}` for every problem)")
        rows.append(_row(read_json(path)))
        key = name_key(rows[-1]["model"])
        if key in names:
            raise UserError(f"{path} field 'submission.model_name': {rows[-1]['model']!r} reads like "
                            f"{names[key][1]!r} of {names[key][0]}; give each entry a distinct name")
        names[key] = (path, rows[-1]["model"])
    if not rows:
        raise UserError(f"{submissions_dir}: no *.json submissions")
    rows.sort(key=lambda r: r.pop("_sort"))
    return rows


def _row(submission: dict) -> dict:
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
    return row


def build_leaderboard(submissions_dir: Path, out_dir: Path, release: dict) -> tuple[Path, Path]:
    rows = leaderboard_rows(submissions_dir, release)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: csv_text(r[c]) if c in TEXT_COLUMNS else r[c] for c in columns} for r in rows)
    csv_path = out_dir / "leaderboard.csv"
    _write_text_atomic(csv_path, buffer.getvalue())
    header = ["#"] + columns
    counts = release.get("sources", {})
    sources = f"{sum(counts.values())} questions: " + ", ".join(f"{name} {count}" for name, count in counts.items())
    lines = [
        "# VQA-Constraints leaderboard",
        "",
        f"Accuracy (%) on the {release['split']} split of the real-world release ({sources}): a normalised "
        "gold answer appears in the model's greedy answer. ci95 is a 95% bootstrap interval; visual / visual+textual "
        "split the questions by constraint type. Every entry passed `vqa-constraints leaderboard validate`, which "
        "checks the data, not that the model really produced the predictions.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if c in ("#",) + TEXT_COLUMNS else "---:" for c in header) + "|",
    ]
    for rank, row in enumerate(rows, start=1):
        lines.append("| " + " | ".join([str(rank)] + [markdown_cell(row[c]) for c in columns]) + " |")
    md_path = out_dir / "leaderboard.md"
    _write_text_atomic(md_path, "\n".join(lines) + "\n")
    return md_path, csv_path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --- CLI ----------------------------------------------------------------------


def _add_release_options(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="check against this build (folder or Hub id) instead of the shipped release")
    source.add_argument("--release", type=Path, help=f"release file (default: {DEFAULT_RELEASE})")


def _release_of(args: argparse.Namespace) -> dict:
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
    samples_path, _ = samples_path_of(Path(path), read_json(Path(path)))
    return [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines()]


def _run_build(args: argparse.Namespace) -> int:
    md_path, csv_path = build_leaderboard(args.submissions_dir, args.out, _release_of(args))
    print(md_path)
    print(csv_path)
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    if args.from_lmms_eval:
        from harness.lmms_eval_samples import prepare_from_lmms_eval

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
    write_release(args.out, release_from_data(args.data, args.split))
    print(args.out)
    return 0

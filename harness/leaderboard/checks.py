"""What `leaderboard validate` checks: a submission's fields, its sample lines one by one against the release,
its metrics recomputed from those lines, and (``--rerun K``) K lines re-scored with the submitted model."""

from __future__ import annotations

import json
import math
import random
import re
import secrets
import unicodedata
from pathlib import Path

from harness.evaluate import EvalOptions, Task, load_adapter, make_backend, score_batch
from harness.leaderboard.release import HASH_FIELDS, LABEL_FIELDS, question_hashes, synthetic_problem
from harness.results import compute_metrics, metrics_close
from harness.runs import read_json, schema_errors
from harness.scoring import answer_correct, exact_match
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split

MAX_PROBLEMS = 20  # per samples file: enough to see the pattern without flooding the terminal


MAX_NAME = 100  # characters of model_name / submitted_by: a leaderboard cell, not a document


RERUN_SEED_BITS = 63  # --rerun's seed: drawn with `secrets`, printed so a maintainer can repeat the draw


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

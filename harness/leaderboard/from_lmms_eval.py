"""Turn an lmms-eval run of the VQA-Constraints tasks (``--log_samples`` files) into a leaderboard submission.

    vqa-constraints leaderboard prepare --from-lmms-eval SAMPLES.jsonl|DIR ... --data BUILD --model MODEL \
        --model-name NAME --submitted-by WHO --out SUBMISSIONS_DIR

Each logged line holds the model's answer (``filtered_resps``), the task's text (``input``) and what
``process_results`` returned, which carries the question id (lmms-eval 0.7 does not log the doc).
The question fields of a sample line come from the build, not from the log, so a log of other data
is refused here; the answer is scored with this project's matcher. The result is an ordinary run
folder handed to ``prepare_submission``: what ``validate`` checks is the same.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from harness.evaluate import RESULTS_FORMAT_VERSION, default_configs, git_commit, library_versions, model_fingerprint
from harness.leaderboard.submission import prepare_submission
from harness.models.loading import hub_revision
from harness.results import compute_metrics
from harness.runs import RESULTS_FILE, SAMPLES_FILE, dumps_line, write_json_atomic, write_lines_atomic
from harness.scoring import DEFAULT_MAX_NEW_TOKENS, answer_correct, clean_generation, exact_match
from vqa_constraints import CONFIGS, __version__
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split
from vqa_constraints.records import sha256_hex

ROW_COLUMNS = ["id", "source", "question", "answers", "constraint_types", "constraints", "relation", "image_id"]


def samples_files(paths: list[Path]) -> list[Path]:
    """The given files, plus every ``*_samples_vqa_constraints_*.jsonl`` inside a given folder (lmms-eval's names)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            # Only files: a folder may carry a log file's name.
            found = sorted(p for p in path.rglob("*_samples_vqa_constraints_*.jsonl") if p.is_file())
            if not found:
                raise UserError(f"{path}: no lmms-eval samples files (*_samples_vqa_constraints_*.jsonl)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def _logged_id(logged: dict) -> str | None:
    # lmms-eval 0.7 writes the metrics process_results returned but drops the doc; the task's
    # breakdown metric carries the id. Versions that keep the doc have it there too.
    for key in ("accuracy_visual", "doc"):
        value = logged.get(key)
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return value["id"]
    return None


def read_logged(files: list[Path]) -> list[tuple[str, str, str, dict]]:
    """(where, id, answer text, the logged line) per logged line."""
    out = []
    for path in files:
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{where}: not an lmms-eval samples line (not UTF-8 text at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                logged = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: not valid JSON ({error.msg})") from None
            except RecursionError:
                raise UserError(f"{where}: not valid JSON (nested too deeply)") from None
            qid = _logged_id(logged) if isinstance(logged, dict) else None
            if qid is None:
                raise UserError(f"{where} field 'accuracy_visual.id': missing; not an lmms-eval samples line "
                                "of the integrations/lmms_eval tasks")
            # lmms-eval 0.7 writes a single response as a string; other versions keep the list.
            answer = logged.get("filtered_resps")
            while isinstance(answer, list) and answer:
                answer = answer[0]
            if not isinstance(answer, str):
                raise UserError(f"{where} field 'filtered_resps': expected the model's answer text, "
                                f"got {logged.get('filtered_resps')!r:.60}")
            out.append((where, qid, answer, logged))
    if not out:
        raise UserError(f"{', '.join(map(str, files))}: no sample lines")
    return out


def _prompt_text(logged: dict) -> str:
    """The task's text as lmms-eval logged it (``input``, or the first request argument); the model adds its template."""
    if isinstance(logged.get("input"), str):
        return logged["input"]
    arguments = logged.get("arguments") or []
    return arguments[0] if arguments and isinstance(arguments[0], str) else ""


def samples_from_logged(logged: list, data: str, split: str) -> tuple[list[dict], dict]:
    """Sample lines (the harness's samples.jsonl shape) in build order, and the loaded splits they came from."""
    splits, rows = {}, {}
    for config in default_configs(data):
        loaded = load_split(data, config, split)
        splits[config] = loaded
        for row in loaded.rows.select_columns(ROW_COLUMNS).to_list():
            rows[row["id"]] = (config, row)
    by_id = {}
    for where, qid, answer, entry in logged:
        if qid not in rows:
            raise UserError(f"{where} field 'accuracy_visual.id': {qid!r} is not a question of {data} ({split} split)")
        if qid in by_id:
            raise UserError(f"{where} field 'accuracy_visual.id': question {qid} appears more than once")
        config, row = rows[qid]
        # What the log says it asked must be the build's question: a log of other data is refused.
        doc = entry.get("doc") if isinstance(entry.get("doc"), dict) else {}
        claims = [("target", entry.get("target"), row["answers"][0])]
        claims += [(f"doc.{name}", doc[name], row[name]) for name in ("question", "answers") if name in doc]
        prompt = _prompt_text(entry)
        if prompt:  # the task's text is the question plus the instruction
            claims.append(("input", prompt, prompt if row["question"] in prompt else row["question"]))
        for name, got, wanted in claims:
            if got is not None and got != wanted:
                raise UserError(f"{where} field '{name}': differs from {data}'s question {qid} (the run scored other data)")
        prediction = clean_generation(answer)
        by_id[qid] = {
            "id": qid, "config": config, "source": row["source"], "question": row["question"],
            "answers": list(row["answers"]), "constraint_types": row["constraint_types"],
            "num_constraints": len(row["constraints"]), "relation": row["relation"],
            "prediction": prediction,
            "correct": answer_correct(prediction, row["answers"]),
            "exact": exact_match(prediction, row["answers"]),
            "answer_logprobs": None, "gold_logprob": None, "confidence": None,  # lmms-eval logs no probabilities
            "prompt_hash": sha256_hex(f"{_prompt_text(entry)}\x1f{row['image_id']}")[:16],
        }
    scored = splits  # every config of the build: the leaderboard ranks full runs only
    for config, loaded in scored.items():
        count = sum(1 for s in by_id.values() if s["config"] == config)
        if count != len(loaded):
            raise UserError(f"{config}: {count} of {len(loaded)} questions of {data} have a sample line in the logs "
                            "(an lmms-eval run with --limit, or of some tasks only?); the leaderboard takes full runs "
                            "of every config")
    order = [row_id for row_id, (config, _) in rows.items() if row_id in by_id]
    return [by_id[qid] for qid in order], scored


def results_of(samples: list[dict], splits: dict, model: str, data: str, split: str, started: float) -> dict:
    """A results.json for the converted samples (scoring "generate", full run, seed 0)."""
    configs = [c for c in CONFIGS if c in splits]
    finished = time.time()
    return {
        "format_version": RESULTS_FORMAT_VERSION,
        "package": {"name": "vqa-constraints", "version": __version__, "git_commit": git_commit()},
        "versions": library_versions(),
        "model": {
            "id": model, "name": Path(model).name if Path(model).is_dir() else model,
            "revision": model_fingerprint(model), "fingerprint": model_fingerprint(model), "family": None,
            "dtype": "unknown (lmms-eval run)", "device": None,
        },
        "dataset": {
            "data": data, "revision": None, "split": split, "configs": configs,
            "fingerprints": {c: splits[c].fingerprint for c in configs},
            "files_sha256": {c: splits[c].files_sha256 for c in configs},
            "sizes": {c: len(splits[c]) for c in configs},
        },
        "options": {
            "scoring": "generate", "backend": "hf", "batch_size": 1, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            "decoding": "lmms-eval generate_until (integrations/lmms_eval task YAML)", "limit": None, "shard": None,
            "seed": 0, "source": "lmms-eval --log_samples",
        },
        "timing": {"started": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(started)),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(finished)),
                   "seconds": round(finished - started, 3)},
        "n": len(samples),
        "metrics": compute_metrics(samples, configs, 0),
    }


def check_model(model: str) -> None:
    """``--model`` must be a local model folder or a Hub model this machine can pin to a commit."""
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: not a model folder (no config.json)")
    elif hub_revision(model) is None:
        raise UserError(f"--model {model}: no such folder, and no Hub model of that id is available here "
                        "(the submission must pin the model's revision)")


def lmms_eval_command(model: str) -> str:
    return (f"lmms-eval --model llava_hf --model_args pretrained={model} --tasks vqa_constraints_all "
            "--include_path integrations/lmms_eval --batch_size 1 --log_samples --output_path LOGS")


def prepare_from_lmms_eval(paths, data: str, model: str, out_dir: Path, model_name: str, submitted_by: str,
                           split: str = "test", command: str = "", **extra) -> Path:
    """Convert the logged samples, then write the submission exactly as ``prepare`` does for a run folder."""
    started = time.time()
    samples, splits = samples_from_logged(read_logged(samples_files(paths)), data, split)
    check_model(model)
    results = results_of(samples, splits, model, data, split, started)
    with tempfile.TemporaryDirectory(prefix="lmms-eval-run-") as run_dir:
        write_lines_atomic(Path(run_dir) / SAMPLES_FILE, (dumps_line(s) for s in samples))
        write_json_atomic(Path(run_dir) / RESULTS_FILE, results)
        return prepare_submission(Path(run_dir), out_dir, model_name, submitted_by,
                                  command=command or lmms_eval_command(model), **extra)

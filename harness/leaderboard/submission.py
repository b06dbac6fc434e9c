"""`leaderboard prepare`: a finished run folder made into ``OUT/<name>.json`` + ``OUT/<name>.samples.jsonl``."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from harness.leaderboard.checks import check_sample_file, name_problems
from harness.runs import RESULTS_FILE, SAMPLES_FILE, read_json, schema_errors, write_json_atomic
from vqa_constraints.errors import UserError
from vqa_constraints.files import atomic_path


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
    with atomic_path(samples_target) as staging:
        shutil.copyfile(run_dir / SAMPLES_FILE, staging)
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

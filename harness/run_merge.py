"""`vqa-constraints merge` for evaluate: finished ``--shard`` runs of one evaluation combined into the run folder
an unsharded run would have written (refusing runs of other evaluations, unfinished shards, overlaps and gaps)."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.evaluate import plan_tasks
from harness.results import compute_metrics
from harness.runs import (
    IDENTITY_KEYS,
    RESULTS_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    check_same_identity,
    dumps_line,
    read_json,
    read_samples,
    write_json_atomic,
    write_lines_atomic,
)
from harness.shards import Shard, check_shard_ids, check_shard_set, check_tiling, parse_shard
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split


def merge_runs(run_dirs: list, out) -> Path:
    """Combine finished shard runs of one evaluation into one run folder at ``out``.

    Refuses runs of different evaluations, unfinished shards, overlaps and gaps.
    The merged folder is assembled beside ``out`` and renamed into place.
    """

    if not run_dirs:
        raise UserError("merge: give at least one run folder")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty; choose a new folder")
    per_shard = ("shard", "start", "end")
    runs = []
    for folder in map(Path, run_dirs):
        if not (folder / RUN_FILE).exists():
            raise UserError(f"{folder}: not a run folder (no {RUN_FILE})")
        identity = read_json(folder / RUN_FILE).get("identity")
        bad = _bad_identity(identity)
        if bad is not None:
            raise UserError(f"{folder / RUN_FILE} field 'identity{bad}': missing or malformed; not a run.json "
                            "written by evaluate")
        if not (folder / RESULTS_FILE).exists():
            raise UserError(f"{folder}: run is not finished (no {RESULTS_FILE}); rerun its evaluate command to finish it")
        results = read_json(folder / RESULTS_FILE)
        if not all(isinstance(results.get(k), dict) for k in ("options", "timing", "dataset")) or not isinstance(
                results["dataset"].get("data"), str):
            raise UserError(f"{folder / RESULTS_FILE} field 'options/timing/dataset.data': missing; not a results.json "
                            "written by evaluate")
        samples, dropped = read_samples(folder / SAMPLES_FILE)
        expected = identity["end"] - identity["start"]
        if dropped or len(samples) != expected:
            raise UserError(
                f"{folder / SAMPLES_FILE}: holds {len(samples)} good lines but the run covers {expected} questions"
            )
        runs.append((folder, identity, results, samples))
    first_folder, first_identity, first_results, _ = runs[0]
    shared = [k for k in IDENTITY_KEYS if k not in per_shard]
    for folder, identity, _, _ in runs[1:]:
        check_same_identity(
            folder / RUN_FILE,
            {k: identity.get(k) for k in shared},
            {k: first_identity.get(k) for k in shared},
        )
    parsed = {folder: _recorded_shard(identity.get("shard"), folder / RUN_FILE) for folder, identity, _, _ in runs}
    check_shard_set([(str(folder), shard) for folder, shard in parsed.items()])
    total = first_identity["total"]
    for folder, identity, _, _ in runs:
        if (identity["start"], identity["end"]) != parsed[folder].bounds(total):
            raise UserError(f"{folder / RUN_FILE} field 'identity.start/end': {identity['start']}..{identity['end']} "
                            f"is not shard {parsed[folder]}'s slice {parsed[folder].bounds(total)} of {total}")
    check_tiling([(str(f), i["start"], i["end"]) for f, i, _, _ in runs], total)
    runs.sort(key=lambda r: r[1]["start"])
    # Each shard must hold exactly its slice of the question list, read back from the data it scored.
    assigned = _evaluated_ids(first_identity, first_results["dataset"]["data"], first_folder / RUN_FILE)
    for folder, _, _, run_samples in runs:
        check_shard_ids(str(folder / SAMPLES_FILE), parsed[folder], assigned, [s["id"] for s in run_samples],
                        every=True)
    samples = [s for _, _, _, run_samples in runs for s in run_samples]

    identity = dict(first_identity, shard=None, start=0, end=total)
    results = dict(first_results)
    results["options"] = dict(first_results["options"], shard=None, range=[0, total])
    timings = [r[2]["timing"] for r in runs]
    results["timing"] = {
        "started": min(t["started"] for t in timings),
        "finished": max(t["finished"] for t in timings),
        "seconds": round(sum(t["seconds"] for t in timings), 3),
        "scored_this_session": sum(t.get("scored_this_session") or 0 for t in timings),
        "questions_per_second": None,
    }
    results["merged_from"] = [r[1]["shard"] or "all" for r in runs]
    results["n"] = len(samples)
    results["metrics"] = compute_metrics(samples, identity["configs"], identity["seed"])

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_json_atomic(staging / RUN_FILE, {"identity": identity})
    write_lines_atomic(staging / SAMPLES_FILE, [dumps_line(s) for s in samples])
    write_json_atomic(staging / RESULTS_FILE, results)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out


_IDENTITY_TYPES = {"total": int, "start": int, "end": int, "configs": list, "fingerprints": dict, "split": str}


def _bad_identity(identity) -> str | None:
    """The first missing or malformed field of a run.json identity ("" for the whole), None when it is usable."""
    if not isinstance(identity, dict):
        return ""
    for key, kind in _IDENTITY_TYPES.items():
        if not isinstance(identity.get(key), kind) or isinstance(identity.get(key), bool):
            return f".{key}"
    if not 0 <= identity["start"] <= identity["end"] <= identity["total"]:
        return ".start/end"
    return None


def _recorded_shard(text, where) -> Shard | None:
    """The shard a file records, or None; UserError naming the file (not the flag) when malformed."""
    try:
        return parse_shard(text)
    except UserError as error:
        raise UserError(f"{where} field 'shard': {str(error).removeprefix('--shard ')}") from None


def _evaluated_ids(identity: dict, data: str, where) -> list[str]:
    """The ordered question list an evaluate run with this identity scored, read from its ``data``."""
    splits = {c: load_split(data, c, identity["split"], revision=identity.get("data_revision"))
              for c in identity["configs"]}
    for config, split in splits.items():
        if split.fingerprint != identity["fingerprints"].get(config):
            raise UserError(f"{where} field 'fingerprints.{config}': {data} has changed since the shards were scored; "
                            "merge needs the data they read")
    ids = [task.id for task in plan_tasks(splits, identity.get("limit"))]
    if len(ids) != identity["total"]:
        raise UserError(f"{where} field 'total': {identity['total']}, but {data} holds {len(ids)} questions")
    return ids

"""``--shard I/N``: a deterministic, contiguous slice of the ordered question list.

Shard I of N (0-based, like SLURM_ARRAY_TASK_ID and torchrun's RANK) takes the
questions ``[total*I//N, total*(I+1)//N)``, so N shards tile the list exactly
and ``vqa-constraints merge`` can check for overlaps and gaps from the ranges alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vqa_constraints.errors import UserError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, end) of this shard within ``total`` ordered questions."""
        return total * self.index // self.count, total * (self.index + 1) // self.count


def parse_shard(text: str | None) -> Shard | None:
    """``"I/N"`` -> Shard; None for no sharding. Raises UserError when malformed or out of range."""
    if text is None or text == "":
        return None
    if isinstance(text, Shard):
        return text
    match = _SHARD.match(str(text))
    if not match:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise UserError(f"--shard {text!r}: N must be at least 1")
    if not 0 <= index < count:
        raise UserError(f"--shard {text!r}: I must be in 0..{count - 1} (shards are numbered from 0)")
    return Shard(index, count)


def aligned_window(start: int, end: int, total: int, batch_size: int) -> tuple[int, int]:
    """The smallest [low, high) around [start, end) made of whole batches ``[k*B, (k+1)*B)`` of the full list.

    Computing a shard's batches over this window gives every question the same batch neighbours as an
    unsharded run, hence bit-identical numbers.
    """
    low = start - start % batch_size
    high = min(total, -(-end // batch_size) * batch_size)
    return low, max(low, high)


def check_tiling(ranges: list[tuple[str, int, int]], total: int) -> None:
    """Check that named [start, end) ranges cover [0, total) exactly once; UserError naming the overlap or gap."""
    position = 0
    for name, start, end in sorted(ranges, key=lambda r: (r[1], r[2])):
        if start < position:
            raise UserError(f"{name}: questions {start}..{min(end, position) - 1} overlap another run")
        if start > position:
            raise UserError(f"gap: questions {position}..{start - 1} are in none of the runs (next is {name})")
        position = end
    if position < total:
        raise UserError(f"gap: questions {position}..{total - 1} of {total} are in none of the runs")


def check_shard_set(shards: list[tuple[str, "Shard | None"]]) -> int:
    """Check that ``shards`` ((where, parsed shard) pairs) are each of the N shards of one split exactly once.

    Returns N. A folder made without ``--shard`` is refused: merging one whole run would only copy it.
    """
    for name, shard in shards:
        if shard is None:
            raise UserError(f"{name}: not a shard (made without --shard); there is nothing to merge it with")
    counts = sorted({shard.count for _, shard in shards})
    if len(counts) != 1:
        raise UserError(f"merge: the runs come from different --shard splits (N = {counts})")
    count = counts[0]
    indices = sorted(shard.index for _, shard in shards)
    # Compared without listing range(N): N comes from a file and may be absurdly large.
    if len(indices) != count or len(set(indices)) != count:
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        missing = [i for i in range(min(count, 1000)) if i not in indices][:10]
        raise UserError(f"merge: need each of the {count} shards exactly once (missing {missing or 'none'}"
                        f"{' ...' if count > 1000 else ''}, repeated {repeated or 'none'}, given {indices[:20]})")
    return count


def check_shard_ids(where: str, shard: Shard, assigned: list[str], found: list[str], every: bool) -> None:
    """Check that the question ids ``found`` in one shard's output (in file order) are the ones its I/N assigns.

    ``assigned`` is the whole ordered question list. ``every``: the shard must hold a line for each of its
    questions (evaluate); otherwise for a subset, in order (trace and attention skip some questions), and the
    rows of one question must be adjacent. Catches rows copied from another shard, dropped or swapped.
    """
    start, end = shard.bounds(len(assigned))
    mine = assigned[start:end]
    if every:
        if found == mine:
            return
        if len(found) != len(mine):
            raise UserError(f"{where}: shard {shard} holds {len(found)} lines, but it covers {len(mine)} questions "
                            f"({start}..{end - 1} of {len(assigned)})")
        position = {qid: i for i, qid in enumerate(assigned)}
        number, got, wanted = next((n, g, w) for n, (g, w) in enumerate(zip(found, mine), start=1) if g != w)
        if got not in position:
            raise UserError(f"{where} line {number} field 'id': {got!r} is not a question of the data")
        raise UserError(f"{where} line {number} field 'id': question {got} is number {position[got]} of the list, "
                        f"but shard {shard} holds questions {start}..{end - 1} in order (expected {wanted})")
    index = {qid: i for i, qid in enumerate(mine)}
    last, done = -1, set()
    for number, qid in enumerate(found, start=1):
        if qid not in index:
            raise UserError(f"{where} row {number} field 'id': question {qid!r} is not one of shard {shard}'s "
                            f"questions {start}..{end - 1} (rows copied from another shard or run?)")
        if index[qid] != last:
            if index[qid] < last or qid in done:
                raise UserError(f"{where} row {number} field 'id': question {qid} is out of the question order")
            done.add(qid)
            last = index[qid]


def merge_runs(run_dirs: list, out) -> "Path":
    """Combine finished shard runs of one evaluation into one run folder at ``out``.

    Refuses runs of different evaluations, unfinished shards, overlaps and gaps.
    The merged folder is assembled beside ``out`` and renamed into place.
    """
    import shutil
    from pathlib import Path

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
    from harness.evaluate import plan_tasks
    from vqa_constraints.loading import load_split

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

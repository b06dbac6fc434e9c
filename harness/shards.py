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
        identity = read_json(folder / RUN_FILE).get("identity", {})
        if not (folder / RESULTS_FILE).exists():
            raise UserError(f"{folder}: run is not finished (no {RESULTS_FILE}); rerun its evaluate command to finish it")
        results = read_json(folder / RESULTS_FILE)
        samples, dropped = read_samples(folder / SAMPLES_FILE)
        expected = identity.get("end", 0) - identity.get("start", 0)
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
    total = first_identity["total"]
    check_tiling([(str(f), i["start"], i["end"]) for f, i, _, _ in runs], total)
    runs.sort(key=lambda r: r[1]["start"])
    samples = [s for _, _, _, run_samples in runs for s in run_samples]
    ids = [s["id"] for s in samples]
    if len(set(ids)) != len(ids):
        raise UserError("merge: the same question id appears in more than one run")

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

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

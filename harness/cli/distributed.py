"""Data-parallel `evaluate`, `trace` and `attention` under ``torchrun`` or ``accelerate launch``.

A launcher starts one process per rank and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). Each rank then does exactly what ``--shard RANK/WORLD_SIZE``
does (the same slice, harness/shards.py) on its own device, into ``OUT/.shards/rank-I-of-N``; after a
``torch.distributed`` barrier rank 0 merges the shards with the code behind ``vqa-constraints merge`` and moves the
result into ``OUT``. So the merged files equal a one-process run's, and the shard folders are what a rerun resumes
from: `evaluate` resumes a shard question by question, `trace` and `attention` keep a finished shard written with
the same arguments and redo an unfinished one.

Without a launcher (or with ``WORLD_SIZE=1``) the commands run as before: the decorator is a pass-through.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from vqa_constraints.errors import UserError

from harness.shards import Shard

SHARDS_FOLDER = ".shards"
MERGED_FOLDER = "merged"
ARGS_FILE = "launch_args.json"  # a finished trace/attention shard's arguments: a rerun keeps it only if they match
# Ranks wait at the barrier for the slowest shard; the default 30 minutes is shorter than one shard of a 7B run.
BARRIER_TIMEOUT = timedelta(days=7)
# The document that says a finished output is finished, per command; written last when the merge is moved in.
MAIN_FILE = {"evaluate": "results.json", "trace": "trace_stats.json", "attention": "attention_stats.json"}
# Options that differ between ranks by construction; every other option must match for a shard to be kept.
PER_RANK_OPTIONS = ("func", "out", "shard", "device", "no_progress")


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def folder(self, out: Path, rank: int | None = None) -> Path:
        """Where rank ``rank`` (default: this one) writes its shard inside the requested ``--out``."""
        rank = self.rank if rank is None else rank
        return Path(out) / SHARDS_FOLDER / f"rank-{rank}-of-{self.world_size}"


def launch_from_env(environ=None) -> Launch | None:
    """The launch this process is part of, from torchrun's / accelerate's variables; None when not launched or alone."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    values = {}
    for name, default in (("WORLD_SIZE", None), ("RANK", None), ("LOCAL_RANK", "RANK"),
                          ("LOCAL_WORLD_SIZE", "WORLD_SIZE")):
        text = environ.get(name, environ.get(default) if default else None)
        try:
            values[name] = int(text)
        except (TypeError, ValueError):
            raise UserError(f"environment variable {name}={text!r}: expected a whole number (set by torchrun "
                            "or accelerate launch)") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise UserError(f"environment: RANK={launch.rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={launch.world_size})")
    if launch.local_world_size < 1 or not 0 <= launch.local_rank < launch.local_world_size:
        raise UserError(f"environment: LOCAL_RANK={launch.local_rank} is not in 0..LOCAL_WORLD_SIZE-1 "
                        f"(LOCAL_WORLD_SIZE={launch.local_world_size})")
    return launch if launch.world_size > 1 else None


def visible_gpus(environ=None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them; [] without CUDA.

    Counted through NVML (torch.cuda.device_count), which does not start CUDA, so CUDA_VISIBLE_DEVICES can still
    be narrowed for this process afterwards.
    """
    import torch

    environ = os.environ if environ is None else environ
    count = torch.cuda.device_count()
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in listed.split(",") if n.strip()] if listed is not None else None
    return (names if names is not None else [str(i) for i in range(count)])[:count]


def rank_placement(launch: Launch, device: str, device_map: str | None,
                   gpus: list[str]) -> tuple[str, list[str] | None]:
    """(the --device this rank loads on, the GPUs to leave visible to it or None to leave them as they are).

    One model per GPU: local rank r takes cuda:r. With --device-map, each rank spreads its copy over its own
    block of GPUs: with G visible GPUs and L ranks on the node, local rank r gets GPUs [r*G/L, (r+1)*G/L).
    """
    per_node = launch.local_world_size
    if not gpus or device == "cpu":
        return ("cpu" if device == "auto" else device), None
    if device_map is not None:
        if len(gpus) < per_node or len(gpus) % per_node:
            raise UserError(f"--device-map {device_map}: {len(gpus)} visible GPUs do not split evenly among "
                            f"{per_node} ranks per node; start a number of ranks that divides {len(gpus)}")
        size = len(gpus) // per_node
        return device, gpus[launch.local_rank * size:(launch.local_rank + 1) * size]
    if device not in ("auto", "cuda"):
        return device, None  # an explicit cuda:N is the user's choice
    if per_node > len(gpus):
        raise UserError(f"{per_node} ranks per node but {len(gpus)} visible GPUs: start at most {len(gpus)} "
                        "ranks per node (or use --device cpu)")
    return f"cuda:{launch.local_rank}", None


def data_parallel(kind: str):
    """Decorate a command's ``func(args)``: run it as rank RANK's shard when launched, then merge on rank 0."""
    def wrap(command):
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            launch = launch_from_env()
            return command(args) if launch is None else _run_rank(launch, kind, command, args)
        return run
    return wrap


def single_process(kind: str):
    """Decorate a command that cannot be split among ranks: refuse to run under a launcher with several ranks."""
    def wrap(command):
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            launch = launch_from_env()
            if launch is not None:
                raise UserError(f"{kind}: runs as one process (WORLD_SIZE={launch.world_size} given): its key "
                                "position, layer and covariance are chosen over all requests together; start it "
                                "without torchrun / accelerate launch")
            return command(args)
        return run
    return wrap


def _run_rank(launch: Launch, kind: str, command, args: argparse.Namespace) -> int:
    if getattr(args, "shard", None):
        raise UserError(f"--shard {args.shard}: the launcher already splits the questions among its "
                        f"{launch.world_size} ranks; drop --shard (or run without the launcher)")
    out = Path(args.out)
    device, gpus = rank_placement(launch, args.device, getattr(args, "device_map", None), visible_gpus())
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # before CUDA starts in this process
    mine = copy.copy(args)
    mine.shard, mine.out, mine.device = str(launch.shard), launch.folder(out), device
    if launch.rank != 0 and hasattr(mine, "no_progress"):
        mine.no_progress = True  # one progress bar per job, not one per rank
    group = _init_group(launch, device, gpus)
    try:
        if not _kept(kind, mine):
            (mine.out / ARGS_FILE).unlink(missing_ok=True)
            code = command(mine)
            if code:
                return code
            if kind != "evaluate":  # evaluate's run folder checks its own arguments when it resumes
                _write_args(mine)
        _barrier(group)
        if launch.rank == 0:
            _merge(kind, launch, out)
        return 0
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _init_group(launch: Launch, device: str, gpus: list[str] | None):
    """Join the launcher's process group: nccl when this rank computes on a GPU, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    on_cuda = bool(gpus) or device.startswith("cuda")
    if on_cuda:
        # After narrowing CUDA_VISIBLE_DEVICES this rank's first GPU is cuda:0.
        torch.cuda.set_device(0 if gpus else torch.device(device).index or 0)
        if gpus and torch.cuda.device_count() != len(gpus):
            # CUDA started before the narrowing (something queried it earlier): ranks would share GPUs.
            raise RuntimeError(f"CUDA_VISIBLE_DEVICES={','.join(gpus)} was set after CUDA started in this process")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(f"environment: WORLD_SIZE={launch.world_size} but no {', '.join(missing)}; start the "
                        "command through torchrun or accelerate launch")
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return dist.group.WORLD


def _barrier(group) -> None:
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        dist.barrier(group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group)


def _recorded_args(args: argparse.Namespace) -> dict:
    kept = {k: v for k, v in vars(args).items() if k not in PER_RANK_OPTIONS}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def _write_args(args: argparse.Namespace) -> None:
    path = Path(args.out) / ARGS_FILE
    path.write_text(json.dumps(_recorded_args(args), sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _kept(kind: str, args: argparse.Namespace) -> bool:
    """A finished trace/attention shard written with these arguments is kept; evaluate resumes on its own."""
    if kind == "evaluate":
        return False
    folder = Path(args.out)
    try:
        document = json.loads((folder / MAIN_FILE[kind]).read_text(encoding="utf-8"))
        recorded = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return document.get("complete") is True and recorded == _recorded_args(args)


def _merge(kind: str, launch: Launch, out: Path) -> None:
    """Rank 0: merge every rank's shard with `merge`'s code, move the result into ``out``, print its summary."""
    shards = [launch.folder(out, rank) for rank in range(launch.world_size)]
    staging = out / SHARDS_FOLDER / MERGED_FOLDER
    shutil.rmtree(staging, ignore_errors=True)
    if kind == "evaluate":
        from harness.run_merge import merge_runs

        merge_runs(shards, staging)
    elif kind == "trace":
        from harness.tracing.shard_merge import merge_traces

        merge_traces(shards, staging)
    else:
        from harness.tracing.shard_merge import merge_attention

        merge_attention(shards, staging)
    main = MAIN_FILE[kind]
    # The document that marks the output finished goes in last.
    for path in sorted(staging.iterdir(), key=lambda p: p.name == main):
        os.replace(path, out / path.name)
    staging.rmdir()
    document = json.loads((out / main).read_text(encoding="utf-8"))
    if kind == "evaluate":
        from harness.evaluate import print_table

        print_table(document)
    elif kind == "trace":
        from harness.tracing.summaries import print_trace_summary

        print_trace_summary(document)
    else:
        from harness.tracing.summaries import print_attention_summary

        print_attention_summary(document, out)
    print(f"merged {launch.world_size} ranks' shards ({out / SHARDS_FOLDER}) into {out / main}")


if __name__ == "__main__":  # `torchrun -m harness.cli.distributed evaluate ...` where the console script is not on PATH
    from vqa_constraints.cli import main

    main()

"""`evaluate`, `trace` and `attention` under torchrun (gloo, CPU): each rank takes its `--shard` slice, rank 0
merges, and the files equal a one-process run's; a rerun after a rank died redoes only that rank's missing part.
Also the rank/GPU arithmetic of harness/cli/distributed.py and what a launched command refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from harness.cli.distributed import Launch, launch_from_env, rank_placement
from vqa_constraints.cli import run
from vqa_constraints.errors import UserError


def _launch(rank, world, local_rank=None, local_world=None):
    return Launch(rank, world, rank if local_rank is None else local_rank,
                  world if local_world is None else local_world)


GPUS8 = [str(i) for i in range(8)]


@pytest.mark.parametrize("launch, device, device_map, gpus, expected", [
    # one node of 8 GPUs, one model per GPU: local rank r on cuda:r, CUDA_VISIBLE_DEVICES left alone
    (_launch(5, 8), "auto", None, GPUS8, ("cuda:5", None)),
    (_launch(0, 8), "cuda", None, GPUS8, ("cuda:0", None)),
    # two nodes of 4: the global rank 6 is local rank 2 on the second node
    (_launch(6, 8, 2, 4), "auto", None, GPUS8[:4], ("cuda:2", None)),
    # a model over 2 GPUs (--device-map auto), 4 ranks on a node of 8: rank r sees GPUs 2r and 2r+1
    (_launch(0, 4), "auto", "auto", GPUS8, ("auto", ["0", "1"])),
    (_launch(3, 4), "auto", "auto", GPUS8, ("auto", ["6", "7"])),
    # 2 ranks of 4 GPUs each, where the job was given GPUs 4..7 only: the rank's block is of the visible names
    (_launch(1, 2), "auto", "auto", ["4", "5", "6", "7"], ("auto", ["6", "7"])),
    # no GPU: every rank on the CPU, whatever the placement strategy
    (_launch(1, 2), "auto", None, [], ("cpu", None)),
    (_launch(1, 2), "auto", "auto", [], ("cpu", None)),
    (_launch(1, 2), "cpu", None, GPUS8, ("cpu", None)),
    # an explicit device is the user's choice
    (_launch(1, 2), "cuda:3", None, GPUS8, ("cuda:3", None)),
])
def test_each_rank_gets_its_own_devices(launch, device, device_map, gpus, expected):
    assert rank_placement(launch, device, device_map, gpus) == expected


def test_every_gpu_is_used_once_by_the_ranks_of_a_node():
    blocks = [rank_placement(_launch(r, 4), "auto", "auto", GPUS8)[1] for r in range(4)]
    assert sorted(g for block in blocks for g in block) == GPUS8 and all(len(b) == 2 for b in blocks)


@pytest.mark.parametrize("launch, device_map, gpus, message", [
    (_launch(0, 3), "auto", GPUS8, "8 visible GPUs do not split evenly among 3 ranks"),
    (_launch(0, 16), "auto", GPUS8, "8 visible GPUs do not split evenly among 16 ranks"),
    (_launch(0, 9), None, GPUS8, "9 ranks per node but 8 visible GPUs"),
])
def test_placements_that_do_not_fit_are_refused(launch, device_map, gpus, message):
    with pytest.raises(UserError, match=message):
        rank_placement(launch, "auto", device_map, gpus)


def test_the_launch_is_read_from_the_launchers_variables():
    assert launch_from_env({}) is None
    assert launch_from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # one process: as before
    env = {"WORLD_SIZE": "8", "RANK": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert launch_from_env(env) == Launch(6, 8, 2, 4)
    assert launch_from_env({"WORLD_SIZE": "2", "RANK": "1"}) == Launch(1, 2, 1, 2)
    with pytest.raises(UserError, match="RANK=2 is not in"):
        launch_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(UserError, match="RANK=None"):
        launch_from_env({"WORLD_SIZE": "2"})


def test_a_launcher_and_shard_together_or_edit_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = run(["evaluate", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), "--shard", "0/2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: --shard 0/2: the launcher already splits")
    code = run(["edit", "--model", "m", "--data", "d", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: edit: runs as one process") and "Traceback" not in "\n".join(err)
    assert not any(tmp_path.iterdir())


def torchrun(argv: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m harness.cli.distributed ARGV` on the CPU, one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--standalone", "-m", "harness.cli.distributed", *map(str, argv)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _evaluate_argv(model, data, out):
    return [str(word) for word in ["evaluate", "--model", model, "--data", data, "--out", out, "--limit", "3",
                                   "--batch-size", "2", "--dtype", "float32", "--device", "cpu", "--no-progress"]]


def test_torchrun_evaluate_equals_one_process_and_resumes_a_dead_rank(planted_model_dir, planted_data_dir, tmp_path):
    single, launched = tmp_path / "single", tmp_path / "launched"
    assert run(_evaluate_argv(planted_model_dir, planted_data_dir, single)) == 0
    result = torchrun(_evaluate_argv(planted_model_dir, planted_data_dir, launched))
    assert f"into {launched / 'results.json'}" in result.stdout
    expected = (single / "samples.jsonl").read_bytes()
    assert (launched / "samples.jsonl").read_bytes() == expected
    assert (launched / "run.json").read_bytes() == (single / "run.json").read_bytes()
    merged = json.loads((launched / "results.json").read_text())
    assert merged["metrics"] == json.loads((single / "results.json").read_text())["metrics"]
    ranks = [launched / ".shards" / f"rank-{r}-of-2" for r in range(2)]
    sizes = [len((r / "samples.jsonl").read_text().splitlines()) for r in ranks]
    assert sum(sizes) == 9 and min(sizes) > 0  # 3 configs x 3 questions, split between the ranks

    # Rank 1 dies after scoring one question: its samples hold one line and it wrote no results.json,
    # and the merged output was never written.
    lines = (ranks[1] / "samples.jsonl").read_text().splitlines(keepends=True)
    (ranks[1] / "samples.jsonl").write_text(lines[0])
    (ranks[1] / "results.json").unlink()
    for name in ("samples.jsonl", "results.json", "run.json"):
        (launched / name).unlink()
    torchrun(_evaluate_argv(planted_model_dir, planted_data_dir, launched))
    scored = [json.loads((r / "results.json").read_text())["timing"]["scored_this_session"] for r in ranks]
    assert scored == [0, sizes[1] - 1]  # only the missing part of rank 1's shard was scored again
    assert (launched / "samples.jsonl").read_bytes() == expected


def _trace_argv(model, data, out):
    # --traced all: the tiny random LLaVA answers wrong, so each question traces the model's own top answer
    return [str(word) for word in ["trace", "--model", model, "--data", data, "--config", "single_constraint",
                                   "--out", out, "--limit", "5", "--corruption", "image-noise", "--kinds", "mlp",
                                   "--positions", "last", "--noise-samples", "2", "--traced", "all",
                                   "--dtype", "float32", "--device", "cpu", "--no-progress"]]


def test_torchrun_trace_equals_one_process_and_redoes_only_an_unfinished_shard(tiny_model_dirs, planted_data_dir,
                                                                               tmp_path):
    model = tiny_model_dirs("llava")
    single, launched = tmp_path / "single", tmp_path / "launched"
    assert run(_trace_argv(model, planted_data_dir, single)) == 0
    torchrun(_trace_argv(model, planted_data_dir, launched))
    expected = (single / "trace_stats.json").read_bytes()
    assert (launched / "trace_stats.json").read_bytes() == expected
    assert pq.read_table(launched / "traces.parquet").equals(pq.read_table(single / "traces.parquet"))
    assert json.loads(expected)["counts"]["traced"] == 5  # real traces from both ranks were merged

    # Rank 1 is killed mid-trace: a SIGKILL leaves no trace_stats.json in its shard. The rerun keeps rank 0's
    # finished shard (same arguments) untouched and traces rank 1's again.
    ranks = [launched / ".shards" / f"rank-{r}-of-2" for r in range(2)]
    (ranks[1] / "trace_stats.json").unlink()
    kept = (ranks[0] / "trace_stats.json").stat().st_mtime_ns
    torchrun(_trace_argv(model, planted_data_dir, launched))
    assert (ranks[0] / "trace_stats.json").stat().st_mtime_ns == kept
    assert (ranks[1] / "trace_stats.json").exists()
    assert (launched / "trace_stats.json").read_bytes() == expected

    # Other arguments: no shard is kept, both are traced again.
    torchrun([*_trace_argv(model, planted_data_dir, launched), "--seed", "1"])
    assert (ranks[0] / "trace_stats.json").stat().st_mtime_ns != kept
    assert json.loads((launched / "trace_stats.json").read_text())["options"]["seed"] == 1


def test_torchrun_attention_equals_one_process(tiny_model_dirs, planted_data_dir, tmp_path):
    argv = ["attention", "--model", str(tiny_model_dirs("llava")), "--data", str(planted_data_dir), "--config",
            "single_constraint", "--limit", "5", "--draws", "2", "--dtype", "float32", "--device", "cpu",
            "--no-progress", "--out"]
    assert run([*argv, str(tmp_path / "single")]) == 0
    torchrun([*argv, str(tmp_path / "launched")])
    for name in ("attention_stats.json", "attention_examples.parquet"):
        assert (tmp_path / "launched" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name

"""`trace --shard I/N` and `attention --shard I/N`, combined by `merge`, give the unsharded run's files."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from vqa_constraints.cli import run

LIMIT = "5"  # shards of 2/2/1 questions: uneven, and not aligned to the generation batch


def _common(model, data):
    return ["--model", str(model), "--data", str(data), "--config", "single_constraint", "--limit", LIMIT,
            "--no-progress", "--dtype", "float32", "--device", "cpu"]


def _trace(model, data, out, *extra):
    # --traced all: the random tiny model answers wrong, so trace its own top answer (every question is traced)
    return run(["trace", *_common(model, data), "--out", str(out), "--kinds", "mlp", "--engine", "fast",
                "--traced", "all", *extra])


def _attention(model, data, out, *extra):
    return run(["attention", *_common(model, data), "--out", str(out), "--draws", "2", *extra])


def _same_table(a, b) -> None:
    left, right = pq.read_table(a), pq.read_table(b)
    assert left.schema.equals(right.schema) and left.to_pylist() == right.to_pylist()


@pytest.mark.parametrize("command, stats_file, rows_file", [
    (_trace, "trace_stats.json", "traces.parquet"),
    (_attention, "attention_stats.json", "attention_examples.parquet"),
])
def test_merged_shards_equal_the_unsharded_run(tiny_model_dirs, planted_data_dir, tmp_path, command, stats_file, rows_file):
    model = tiny_model_dirs("llava")
    assert command(model, planted_data_dir, tmp_path / "all") == 0
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i, folder in enumerate(shards):
        assert command(model, planted_data_dir, folder, "--shard", f"{i}/3") == 0
    assert json.loads((shards[1] / stats_file).read_text())["options"]["shard"] == "1/3"
    # merge takes the shards in any order
    assert run(["merge", str(shards[2]), str(shards[0]), str(shards[1]), "--out", str(tmp_path / "merged")]) == 0
    whole = json.loads((tmp_path / "all" / stats_file).read_text())
    merged = json.loads((tmp_path / "merged" / stats_file).read_text())
    assert merged == whole
    assert whole["counts"].get("traced", whole["counts"].get("analysed")) > 0  # something was really computed
    if stats_file == "trace_stats.json":  # no timing fields: the files are byte-identical
        assert (tmp_path / "merged" / stats_file).read_bytes() == (tmp_path / "all" / stats_file).read_bytes()
    _same_table(tmp_path / "merged" / rows_file, tmp_path / "all" / rows_file)


def test_merge_refuses_missing_or_foreign_shards(tiny_model_dirs, planted_data_dir, tmp_path, capsys):
    model = tiny_model_dirs("llava")
    for i in range(2):
        assert _trace(model, planted_data_dir, tmp_path / f"s{i}", "--shard", f"{i}/2", "--limit", "2") == 0
    assert _trace(model, planted_data_dir, tmp_path / "other", "--shard", "1/2", "--limit", "2", "--window", "2") == 0
    capsys.readouterr()
    assert run(["merge", str(tmp_path / "s0"), "--out", str(tmp_path / "m1")]) == 1
    assert "missing [1]" in capsys.readouterr().err
    assert run(["merge", str(tmp_path / "s0"), str(tmp_path / "other"), "--out", str(tmp_path / "m2")]) == 1
    err = capsys.readouterr().err
    assert "not a shard of the same run" in err and "Traceback" not in err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    assert _trace(model, planted_data_dir, tmp_path / "bad", "--shard", "2/2") == 1
    assert "--shard" in capsys.readouterr().err

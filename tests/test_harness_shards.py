"""--shard I/N slicing and `merge`: shards tile the question list and merge back to the unsharded run."""

from __future__ import annotations

import json
import shutil

import pytest
from harness_support import planted_adapter, run_options, small_run  # noqa: F401  (session fixtures)

from harness.evaluate import evaluate
from harness.run_merge import merge_runs
from harness.shards import Shard, check_tiling, parse_shard
from vqa_constraints.errors import UserError


@pytest.mark.parametrize("text, shard", [("0/1", Shard(0, 1)), ("2/4", Shard(2, 4)), (" 3 / 4 ", Shard(3, 4)), (None, None)])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard


@pytest.mark.parametrize("text, message", [("4/4", "0..3"), ("-1/4", "expected I/N"), ("1/0", "at least 1"), ("half", "expected I/N")])
def test_parse_shard_rejects_bad_values(text, message):
    with pytest.raises(UserError, match=message):
        parse_shard(text)


@pytest.mark.parametrize("total", [0, 1, 7, 18, 101])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shards_tile_every_list(total, count):
    ranges = [(str(i), *Shard(i, count).bounds(total)) for i in range(count)]
    check_tiling(ranges, total)  # raises on overlap or gap
    sizes = [end - start for _, start, end in ranges]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1


def test_check_tiling_names_overlaps_and_gaps():
    with pytest.raises(UserError, match=r"overlap|repeated \[0\]"):
        check_tiling([("a", 0, 5), ("b", 4, 10)], 10)
    with pytest.raises(UserError, match="gap: questions 5..5"):
        check_tiling([("a", 0, 5), ("b", 6, 10)], 10)
    with pytest.raises(UserError, match="gap: questions 8..9"):
        check_tiling([("a", 0, 8)], 10)


@pytest.fixture(scope="module")
def shard_runs(planted_model_dir, planted_data_dir, planted_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return [
        evaluate(run_options(planted_model_dir, planted_data_dir, root / f"shard{i}", shard=f"{i}/3"), adapter=planted_adapter)
        for i in range(3)
    ]


def test_shards_merge_into_the_unsharded_run(shard_runs, small_run, tmp_path):
    sizes = [len((r / "samples.jsonl").read_text().splitlines()) for r in shard_runs]
    assert sizes == [6, 6, 6]
    merged = merge_runs(list(reversed(shard_runs)), tmp_path / "merged")  # any order
    assert (merged / "samples.jsonl").read_bytes() == (small_run / "samples.jsonl").read_bytes()
    merged_results = json.loads((merged / "results.json").read_text())
    full_results = json.loads((small_run / "results.json").read_text())
    assert merged_results["metrics"] == full_results["metrics"]
    assert merged_results["options"]["shard"] is None and merged_results["merged_from"] == ["0/3", "1/3", "2/3"]
    # The merged folder is a finished run: rerunning the unsharded command on it scores nothing new.
    assert json.loads((merged / "run.json").read_text()) == json.loads((small_run / "run.json").read_text())


def test_merge_refuses_overlaps_gaps_and_unfinished_shards(shard_runs, tmp_path):
    with pytest.raises(UserError, match=r"overlap|repeated \[0\]"):
        merge_runs([shard_runs[0], shard_runs[0], shard_runs[1], shard_runs[2]], tmp_path / "a")
    with pytest.raises(UserError, match=r"gap|missing \[1\]"):
        merge_runs([shard_runs[0], shard_runs[2]], tmp_path / "b")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(shard_runs[1], unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(UserError, match="not finished"):
        merge_runs([shard_runs[0], unfinished, shard_runs[2]], tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_merge_refuses_runs_of_different_evaluations(shard_runs, planted_model_dir, planted_data_dir, planted_adapter, tmp_path):
    other = evaluate(
        run_options(planted_model_dir, planted_data_dir, tmp_path / "other", shard="1/3", scoring="generate"),
        adapter=planted_adapter,
    )
    with pytest.raises(UserError, match="scoring"):
        merge_runs([shard_runs[0], other, shard_runs[2]], tmp_path / "merged")

"""A local build is loaded by its files' contents: rebuilt, renamed-alike or corrupted folders are never scored from a stale cache."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vqa_constraints import cli
from vqa_constraints.builder import build
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split

CONFIG = "single_constraint"


def ids_on_disk(folder: Path) -> list[str]:
    shards = sorted((folder / CONFIG).glob("test-*.parquet"))
    return [i for shard in shards for i in pq.read_table(shard, columns=["id"]).column("id").to_pylist()]


def test_a_rebuild_into_the_same_folder_is_loaded_not_the_cached_rows(tmp_path):
    folder = tmp_path / "data"
    build(folder, sources=["planted"], seed=0)
    first = load_split(str(folder), CONFIG)
    assert first.rows["id"] == ids_on_disk(folder)

    build(folder, sources=["planted"], seed=7)
    second = load_split(str(folder), CONFIG)
    assert second.rows["id"] == ids_on_disk(folder)  # the seed-7 rows, not the seed-0 ones
    assert second.rows["id"] != first.rows["id"]
    assert second.fingerprint != first.fingerprint
    assert second.files_sha256 != first.files_sha256


def test_builds_in_same_named_folders_do_not_collide(tmp_path):
    a, b = tmp_path / "study" / "data", tmp_path / "other" / "data"
    build(a, sources=["planted"], seed=0)
    build(b, sources=["planted"], seed=7)
    loaded_a, loaded_b = load_split(str(a), CONFIG), load_split(str(b), CONFIG)
    assert loaded_a.rows["id"] == ids_on_disk(a)
    assert loaded_b.rows["id"] == ids_on_disk(b)
    assert loaded_a.files_sha256 != loaded_b.files_sha256
    # The same bytes in another folder are the same data.
    assert load_split(str(a), CONFIG).files_sha256 == loaded_a.files_sha256


@pytest.mark.parametrize("damage", ["truncate", "overwrite-middle"])
def test_a_shard_corrupted_after_a_load_is_a_clean_error(tmp_path, capsys, damage):
    folder = tmp_path / "data"
    build(folder, sources=["planted"], seed=0)
    load_split(str(folder), CONFIG)  # fills the cache
    shard = sorted((folder / CONFIG).glob("test-*.parquet"))[0]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.write_bytes(data[:100] + bytes(len(data) - 200) + data[-100:])
    with pytest.raises(UserError, match=f"{shard.name}: unreadable parquet"):
        load_split(str(folder), CONFIG)

    # `evaluate` reads the data before the model and stops there, leaving no run folder.
    out = tmp_path / "run"
    code = cli.run(["evaluate", "--model", str(tmp_path / "no-model"), "--data", str(folder), "--out", str(out),
                    "--config", CONFIG, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: ") and shard.name in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_a_run_records_the_fingerprint_of_what_it_read(tmp_path, tiny_model_dirs):
    from harness.evaluate import EvalOptions, evaluate

    folder = tmp_path / "data"
    recorded = []
    for seed in (0, 7):
        build(folder, sources=["planted"], seed=seed)
        out = evaluate(EvalOptions(model=str(tiny_model_dirs("llava")), data=str(folder), out=tmp_path / f"run-{seed}",
                                   configs=[CONFIG], limit=2, progress=False, show_table=False))
        results = json.loads((out / "results.json").read_text())
        run = json.loads((out / "run.json").read_text())
        loaded = load_split(str(folder), CONFIG)
        assert results["dataset"]["fingerprints"][CONFIG] == loaded.fingerprint
        assert run["identity"]["fingerprints"][CONFIG] == loaded.fingerprint
        assert results["dataset"]["files_sha256"][CONFIG] == loaded.files_sha256
        recorded.append(results["dataset"]["fingerprints"][CONFIG])
    assert recorded[0] != recorded[1]

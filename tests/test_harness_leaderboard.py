"""Leaderboard submissions: shipped schemas, the release file, prepare, validate, build and the shipped entries."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import pytest
from harness_support import flags_data_dir, flags_validation_run, planted_adapter, small_run, validation_run  # noqa: F401
from jsonschema import Draft202012Validator

from harness.leaderboard.checks import validate_submission
from harness.leaderboard.release import DEFAULT_RELEASE, load_release, release_from_data
from harness.leaderboard.render import build_leaderboard
from harness.leaderboard.submission import prepare_submission
from harness.runs import load_schema
from vqa_constraints import cli
from vqa_constraints.errors import UserError

SHIPPED = DEFAULT_RELEASE.parent / "submissions"


@pytest.mark.parametrize("name", ["samples", "results", "submission"])
def test_schemas_ship_with_the_package_and_are_valid(name):
    assert resources.files("harness").joinpath("schemas", f"{name}.schema.json").is_file()
    Draft202012Validator.check_schema(load_schema(name))


@pytest.fixture(scope="module")
def release(flags_data_dir):
    return release_from_data(str(flags_data_dir), split="validation")


@pytest.fixture()
def submission(flags_validation_run, tmp_path):
    return prepare_submission(flags_validation_run, tmp_path / "submissions", "planted llava", "tests")


def test_release_holds_a_hash_per_question(release, flags_data_dir):
    assert release["sources"] == {"flags": 159}
    sizes = {config: entry["n"] for config, entry in release["configs"].items()}
    assert sizes == {"single_constraint": 90, "multi_constraint": 27, "encyclopedic": 42}
    for entry in release["configs"].values():
        assert len(entry["questions"]) == entry["n"]
        assert all(len(hashes) == 3 for hashes in entry["questions"].values())


def test_release_cli_round_trip(flags_data_dir, release, tmp_path):
    target = tmp_path / "release.json"
    assert cli.run(["leaderboard", "release", "--data", str(flags_data_dir), "--split", "validation", "--out", str(target)]) == 0
    assert load_release(target) == release
    assert len(target.read_text().splitlines()) < 200  # one line per question, not five


def test_a_planted_build_cannot_be_a_release_or_a_submission(planted_data_dir, validation_run, release, tmp_path):
    with pytest.raises(UserError, match="synthetic source 'planted'"):
        release_from_data(str(planted_data_dir), split="validation")
    planted = prepare_submission(validation_run, tmp_path, "planted", "tests")
    problems = validate_submission(planted, release)
    assert any("field 'metrics.all.by.source'" in p and "synthetic source 'planted'" in p for p in problems)


def test_a_full_run_is_a_valid_submission_and_records_how_to_reproduce_it(submission, release, flags_validation_run):
    assert validate_submission(submission, release) == []
    data = json.loads(submission.read_text())
    reproduce = data["submission"]["reproduce"]
    assert reproduce["model_revision"] == data["model"]["revision"] and reproduce["model_revision"].startswith("sha256:")
    assert reproduce["package_version"] == data["package"]["version"]
    command = reproduce["command"]
    assert command.startswith("vqa-constraints evaluate --model ") and "--split validation" in command
    assert (submission.parent / "planted-llava.samples.jsonl").is_file()


def test_prepare_refuses_a_limited_run(small_run, tmp_path):
    with pytest.raises(UserError, match="--limit"):
        prepare_submission(small_run, tmp_path, "limited", "tests")
    assert not list(tmp_path.iterdir())


def test_validate_cli_prints_every_failure(submission, flags_data_dir, capsys):
    assert cli.run(["leaderboard", "validate", str(submission), "--data", str(flags_data_dir)]) == 1  # test split
    data = json.loads(submission.read_text())
    data["options"]["shard"] = "0/2"
    submission.write_text(json.dumps(data))
    capsys.readouterr()
    release_file = submission.parent / "release.json"
    assert cli.run(["leaderboard", "release", "--data", str(flags_data_dir), "--split", "validation", "--out", str(release_file)]) == 0
    assert cli.run(["leaderboard", "validate", str(submission), "--release", str(release_file)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "merge the shards first" in out


def test_validate_from_another_folder_still_checks_against_the_shipped_release(submission, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.run(["leaderboard", "validate", str(submission)]) == 1
    out = capsys.readouterr().out
    # The shipped release is the flags test split: this validation-split run is refused on its fingerprints.
    assert "field 'dataset.split'" in out and "field 'dataset.fingerprints.single_constraint'" in out


def test_build_validates_sorts_and_escapes(submission, release, tmp_path):
    data = json.loads(submission.read_text())
    data["submission"]["model_name"] = "<script>alert(1)</script>\n| 0 | *fake* [link](http://x) |"
    data["submission"]["submitted_by"] = "=HYPERLINK(\"http://x\")"
    hostile = submission.parent / "hostile.json"
    hostile.write_text(json.dumps(data))
    with pytest.raises(UserError, match="model_name.*line break"):  # a line break would start a table row
        build_leaderboard(submission.parent, tmp_path / "board", release)
    assert not (tmp_path / "board").exists()
    data["submission"]["model_name"] = "<script>alert(1)</script> | 0 | *fake* [link](http://x) |"
    hostile.write_text(json.dumps(data))
    md, csv_path = build_leaderboard(submission.parent, tmp_path / "board", release)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["<script>alert(1)</script> | 0 | *fake* [link](http://x) |", "planted llava"]
    assert rows[0]["submitted_by"].startswith("'=")  # a spreadsheet shows it, never runs it
    assert {"single_constraint", "multi_constraint", "encyclopedic", "visual", "visual+textual"} <= set(rows[0])
    table = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + one line per entry: the newline did not start a row
    assert all(line.count(" | ") == table[0].count(" | ") for line in table)  # escaped pipes split no cell
    assert "<script>" not in md.read_text() and "&lt;script&gt;" in md.read_text()
    assert "\\*fake\\* \\[link\\]" in md.read_text()


def test_build_refuses_an_invalid_entry(submission, release, tmp_path):
    data = json.loads(submission.read_text())
    del data["submission"]["samples"]
    (submission.parent / "no-samples.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="'samples' is a required property"):
        build_leaderboard(submission.parent, tmp_path / "board", release)
    assert not (tmp_path / "board").exists()


def test_shipped_release_is_the_real_world_default_build(flags_data_dir):
    """leaderboard/release.json is exactly the test split of today's default (flags-only) build."""
    shipped = load_release(DEFAULT_RELEASE)
    assert set(shipped["sources"]) == {"flags"}
    assert release_from_data(str(flags_data_dir), split="test") == shipped


@pytest.mark.parametrize("entry", sorted(SHIPPED.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_entry_validates_from_any_folder(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped release is found next to the package, not in the working folder
    assert cli.run(["leaderboard", "validate", str(entry)]) == 0


def test_shipped_tables_are_built_from_the_shipped_entries(tmp_path):
    if not list(SHIPPED.glob("*.json")):
        assert not (SHIPPED.parent / "leaderboard.md").exists()  # no table without validated entries
        return
    assert cli.run(["leaderboard", "build", str(SHIPPED), "--out", str(tmp_path)]) == 0
    for name in ("leaderboard.md", "leaderboard.csv"):
        assert (tmp_path / name).read_text() == (SHIPPED.parent / name).read_text(), name

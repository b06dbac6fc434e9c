"""Leaderboard submissions: shipped schemas, validate (schema, fingerprints, sizes, samples) and build."""

from __future__ import annotations

import csv
import json
from importlib import resources

import pytest
from harness_support import planted_adapter, small_run, validation_run  # noqa: F401  (session fixtures)
from jsonschema import Draft202012Validator

from harness.leaderboard import (
    build_leaderboard,
    load_schema,
    prepare_submission,
    release_from_data,
    validate_submission,
)
from vqa_constraints import cli


@pytest.mark.parametrize("name", ["samples", "results", "submission"])
def test_schemas_ship_with_the_package_and_are_valid(name):
    assert resources.files("harness").joinpath("schemas", f"{name}.schema.json").is_file()
    Draft202012Validator.check_schema(load_schema(name))


@pytest.fixture(scope="module")
def release(planted_data_dir):
    return release_from_data(str(planted_data_dir), split="validation")


@pytest.fixture()
def submission(validation_run, tmp_path):
    return prepare_submission(validation_run, tmp_path / "submissions", "planted llava", "tests")


def test_a_full_run_is_a_valid_submission(submission, release):
    assert validate_submission(submission, release) == []
    assert (submission.parent / "planted-llava.samples.jsonl").is_file()


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_validate_reports_each_problem(submission, release):
    def tamper(data):
        data["metrics"]["all"]["accuracy"]["value"] = 0.123
        data["dataset"]["fingerprints"]["encyclopedic"] = "0" * 64
    _edit(submission, tamper)
    problems = validate_submission(submission, release)
    assert any("fingerprint of 'encyclopedic'" in p for p in problems)
    assert any("metrics.all.accuracy.value" in p for p in problems)


def test_validate_rechecks_correctness_flags_in_samples(submission, release):
    samples_path = submission.parent / "planted-llava.samples.jsonl"
    lines = samples_path.read_text().splitlines()
    first = json.loads(lines[0])
    first["correct"] = not first["correct"]
    samples_path.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    problems = validate_submission(submission, release)
    assert problems == [f"{samples_path} line 1: 'correct' does not follow from prediction and answers"]


def test_validate_rejects_limited_runs_and_wrong_release(small_run, validation_run, tmp_path, release):
    limited = prepare_submission(small_run, tmp_path, "limited", "tests")
    problems = validate_submission(limited, release)
    assert any("--limit" in p for p in problems)
    assert any("scored split 'test'" in p for p in problems)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format_version": 1}')
    assert any("is a required property" in p for p in validate_submission(broken, release))


def test_validate_cli_prints_every_failure(submission, planted_data_dir, capsys, tmp_path):
    release_file = tmp_path / "release.json"
    assert cli.run(["leaderboard", "release", "--data", str(planted_data_dir), "--split", "validation", "--out", str(release_file)]) == 0
    assert cli.run(["leaderboard", "validate", str(submission), "--release", str(release_file)]) == 0
    _edit(submission, lambda d: d["options"].update(shard="0/2"))
    capsys.readouterr()
    assert cli.run(["leaderboard", "validate", str(submission), "--release", str(release_file)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "merge the shards first" in out


def test_build_writes_sorted_markdown_and_csv(submission, tmp_path):
    weaker = submission.parent / "weaker.json"
    data = json.loads(submission.read_text())
    data["submission"]["model_name"] = "weaker model"
    data["metrics"]["all"]["accuracy"]["value"] = data["metrics"]["all"]["accuracy"]["value"] / 2
    weaker.write_text(json.dumps(data))
    md, csv_path = build_leaderboard(submission.parent, tmp_path / "board")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["planted llava", "weaker model"]
    assert {"single_constraint", "multi_constraint", "encyclopedic", "visual", "visual+textual"} <= set(rows[0])
    assert float(rows[0]["accuracy"]) > float(rows[1]["accuracy"])
    text = md.read_text()
    assert text.index("planted llava") < text.index("weaker model")
    assert "| 1 | planted llava |" in text

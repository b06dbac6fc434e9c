"""The record schema and folder rules catch each kind of bad record; `validate` reports them."""

from __future__ import annotations

import copy
import json
import shutil

import datasets
import pyarrow.parquet as pq
import pytest

from vqa_constraints.cli import run
from vqa_constraints.records import FEATURES
from vqa_constraints.sources.planted import records
from vqa_constraints.sources.planted_world import PlantedWorld
from vqa_constraints.validation import row_problems, schema, validate_folder


@pytest.fixture(scope="module")
def good_rows():
    world = PlantedWorld(seed=0, n_scaffold=0, n_known=4, n_longtail=2)
    return [r.to_row() for r in records(world)]


def test_schema_file_is_a_valid_json_schema_covering_every_feature(good_rows):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())
    assert set(schema()["required"]) == set(FEATURES)
    assert all(row_problems(row) == [] for row in good_rows)


def _multi(rows):
    return copy.deepcopy(next(r for r in rows if r["config"] == "multi_constraint"))


BAD_RECORDS = {
    "missing field": (lambda r: r.pop("question"), "question"),
    "empty answers": (lambda r: r.update(answers=[]), "answers"),
    "blank answer": (lambda r: r.update(answers=["  "]), "answers.0"),
    "unknown config": (lambda r: r.update(config="triple_constraint"), "config"),
    "wrong type": (lambda r: r.update(num_constraints="two"), "num_constraints"),
    "bad constraint type": (lambda r: r["constraints"][0].update(type="auditory"), "constraints.0.type"),
    "span outside question": (lambda r: r["constraints"][0].update(char_end=10_000), "constraints.0"),
    "span text mismatch": (lambda r: r["constraints"][0].update(char_start=r["constraints"][0]["char_start"] + 1,
                                                                 char_end=r["constraints"][0]["char_end"] + 1),
                           "constraints.0"),
    "no visual constraint": (lambda r: r["constraints"].pop(0) and r.update(num_constraints=1,
                                                                           constraint_types="textual"),
                             "constraints"),
    "count mismatch": (lambda r: r.update(num_constraints=5), "num_constraints"),
    "types mismatch": (lambda r: r.update(constraint_types="visual"), "constraint_types"),
    "undecodable image": (lambda r: r["image"].update(bytes=b"not a png"), "image"),
    "empty image": (lambda r: r["image"].update(bytes=b""), "image"),
    "image id not its hash": (lambda r: r.update(image_id="0" * 64), "image_id"),
    "undecodable other view": (lambda r: r["other_views"][0].update(bytes=b"xx"), "other_views.0"),
    "meta not json": (lambda r: r.update(meta="{oops"), "meta"),
    "duplicate answer": (lambda r: r.update(answers=r["answers"] * 2), "answers"),
    "extra field": (lambda r: r.update(colour="red"), "record"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_each_kind_of_bad_record_is_caught(good_rows, case):
    mutate, field = BAD_RECORDS[case]
    row = _multi(good_rows)
    mutate(row)
    problems = row_problems(row)
    assert field in [f for f, _ in problems], problems


def _write_folder_copy(planted_data_dir, tmp_path):
    out = tmp_path / "vqa"
    shutil.copytree(planted_data_dir, out)
    return out


def test_validate_reports_record_id_and_field_of_each_violation(planted_data_dir, tmp_path, capsys):
    out = _write_folder_copy(planted_data_dir, tmp_path)
    shard = out / "multi_constraint" / "test-00000-of-00001.parquet"
    rows = pq.read_table(shard).to_pylist()  # images stay {bytes, path} dicts
    rows[0]["answers"] = []
    rows[1]["constraints"][0]["text"] = "the dragon in this image"
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(shard))
    violations = validate_folder(out)
    assert {(v.record_id, v.field) for v in violations} == {(rows[0]["id"], "answers"), (rows[1]["id"], "constraints.0")}
    assert run(["validate", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"id={rows[0]['id']} field 'answers'" in printed and "2 violation(s)" in printed


def test_folder_rules_duplicate_ids_and_card_shards(planted_data_dir, tmp_path):
    out = _write_folder_copy(planted_data_dir, tmp_path)
    # the same rows in a second config: every id is now duplicated across configs
    src = out / "single_constraint" / "validation-00000-of-00001.parquet"
    shutil.copy(src, out / "encyclopedic" / "validation-00000-of-00001.parquet")
    # a shard the card does not list
    shutil.copy(src, out / "single_constraint" / "extra-00000-of-00001.parquet")
    violations = validate_folder(out)
    fields = {v.field for v in violations}
    assert "id" in fields  # duplicates
    assert "config" in fields  # rows say single_constraint but sit in encyclopedic
    assert any("does not list shard single_constraint/extra" in v.message for v in violations)


def test_card_must_have_one_default_and_exist(planted_data_dir, tmp_path):
    out = _write_folder_copy(planted_data_dir, tmp_path)
    card = out / "README.md"
    card.write_text(card.read_text().replace("  default: true\n", ""))
    assert any("exactly one default" in v.message for v in validate_folder(out))
    card.unlink()
    assert [v.field for v in validate_folder(out)] == ["configs"]


def test_validate_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert run(["validate", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_good_build_meta_is_json(planted_data_dir):
    from vqa_constraints.loading import load_split

    record = load_split(str(planted_data_dir), "encyclopedic").record(0)
    assert json.loads(record.meta)["role"] == "longtail"

"""`vqa-constraints attention` end to end on the planted model, and the Python API's reproducibility."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pyarrow.parquet as pq
import pytest

from vqa_constraints.cli import run

LIMIT = 24


@pytest.fixture(scope="session")
def planted_attention(planted_model_dir, planted_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention-planted")
    code = run([
        "attention", "--model", str(planted_model_dir), "--data", str(planted_data_dir),
        "--config", "single_constraint", "--out", str(out), "--limit", str(LIMIT),
        "--top-k", "8", "--draws", "5", "--device", "cpu", "--no-progress",
    ])
    assert code == 0
    return out


def test_cli_writes_valid_outputs(planted_attention, planted_model_dir):
    stats = json.loads((planted_attention / "attention_stats.json").read_text())
    schema = json.loads(
        resources.files("harness.tracing").joinpath("schemas", "attention_stats.schema.json").read_text()
    )
    jsonschema.validate(stats, schema)
    config = json.loads((planted_model_dir / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    assert stats["num_layers"] == layers
    assert stats["counts"]["questions"] == LIMIT
    assert stats["counts"]["analysed"] + sum(stats["counts"]["skipped"].values()) == LIMIT
    for name, measure in stats["per_layer"].items():
        assert [c["layer"] for c in measure["all"]] == list(range(layers))
        # constraint_to_target exists only where a target was traced (targets.modes); the rest on every question
        expected = sum(stats["targets"]["modes"].values()) if name == "constraint_to_target" else stats["counts"]["analysed"]
        assert all(c["n"] == expected for c in measure["all"]), name
        assert all(c["ci_low"] <= c["value"] <= c["ci_high"] for c in measure["all"])
    rows = pq.read_table(planted_attention / "attention_examples.parquet").to_pylist()
    assert len(rows) == stats["counts"]["analysed"]
    assert stats["targets"]["requested"] == "auto"
    for row in rows:
        # the planted model answers with the entity itself: no prefix, so its answer is read at the prompt's
        # last token, and the eager forward gives the probability generation gave its first token
        if row["correct"]:
            assert row["entity_prefix"] == "" and row["entity_read_position"] == row["prompt_last"]
            assert abs(row["confidence"] - row["first_token_confidence"]) < 1e-4
            assert row["target_mode"] == "answer" and row["prefix_names_subject"] is False
            assert abs(row["p_target"] - row["confidence"]) < 1e-6
        assert len(row["image_to_visual"]) == layers and len(row["image_to_visual"][0]) == len(row["image_positions"])
    f2 = stats["finding_2"]
    assert [c["k"] for c in f2["bands"]] == [1, 2, 3] * 3 and f2["n"] == stats["knockout"]["constraint"]["n"]
    for name in ("image_to_constraint.png", "constraint_to_last.png"):
        assert (planted_attention / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_knockout_of_top_tokens_hurts_at_least_as_much_as_random(planted_attention):
    stats = json.loads((planted_attention / "attention_stats.json").read_text())
    assert stats["counts"]["correct"] >= LIMIT // 2  # the planted model knows most of its facts
    for target in ("constraint", "last"):
        assert stats["knockout"][target]["n"] == stats["counts"]["correct"]
    # The planted model reads the image from the last token (see shared notes), so that is where cutting the
    # most-contributing image tokens must hurt at least as much as cutting random ones ...
    last = stats["knockout"]["last"]
    assert last["drop_top"]["value"] >= last["drop_random"]["value"] - 1e-6, last
    # ... while cutting image -> constraint edges barely moves p(answer), whichever tokens are cut.
    constraint = stats["knockout"]["constraint"]
    assert abs(constraint["drop_top"]["value"]) < 0.05 and abs(constraint["drop_random"]["value"]) < 0.05


def test_cli_bad_input_is_one_line(planted_data_dir, tmp_path, capsys):
    code = run(["attention", "--model", str(tmp_path / "missing"), "--data", str(planted_data_dir),
                "--config", "single_constraint", "--out", str(tmp_path / "o"), "--top-k", "0"])
    assert code == 1
    assert "--top-k must be at least 1" in capsys.readouterr().err
    code = run(["attention", "--model", str(tmp_path / "missing"), "--data", str(planted_data_dir),
                "--config", "single_constraint", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "error: --model" in err and "no such model folder" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "attention_stats.json").exists()


def test_api_is_reproducible_byte_for_byte(tiny_model_dirs, planted_data_dir, tmp_path):
    from harness.models.loading import load_model
    from harness.tracing.attention_study import StudyOptions, run_attention_study
    from vqa_constraints.loading import load_split

    adapter = load_model(str(tiny_model_dirs("llava")), device="cpu", dtype="float32")
    split = load_split(str(planted_data_dir), "multi_constraint")
    options = StudyOptions(limit=3, top_k=2, draws=2, progress=False)
    for name in ("a", "b"):
        run_attention_study(adapter, split, tmp_path / name, options)
    for name in ("attention_stats.json", "attention_examples.parquet", "image_to_constraint.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

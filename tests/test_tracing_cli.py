"""`vqa-constraints trace` on bad input: one-line errors, exit code 1, no traceback."""

from __future__ import annotations

import json

import pytest

from vqa_constraints.cli import run


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_model_dirs):
    return tiny_model_dirs("llava")


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _trace(model, data, out, *extra):
    return run(["trace", "--model", str(model), "--data", str(data), "--config", "single_constraint",
                "--out", str(out), "--limit", "3", "--no-progress", "--dtype", "float32", "--device", "cpu", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--window", "99"], "larger than the model"),
    (["--kinds", "mlp,ffn"], "--kinds"),
    (["--text-only", "--corruption", "image-noise"], "cannot be combined"),
])
def test_bad_options_fail_in_one_line(tiny_llava_dir, planted_data_dir, tmp_path, capsys, extra, message):
    assert _trace(tiny_llava_dir, planted_data_dir, tmp_path / "out", *extra) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and message in errors[0]


def test_unsupported_model_fails_in_one_line(planted_data_dir, tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    assert _trace(folder, planted_data_dir, tmp_path / "out") == 1
    assert len(_errors(capsys)) == 1


def test_wrong_answers_are_skipped_counted_and_written(tiny_llava_dir, planted_data_dir, tmp_path, capsys):
    # A random model answers nothing right: every question is a counted skip, and the outputs still exist.
    assert _trace(tiny_llava_dir, planted_data_dir, tmp_path / "out") == 0
    stats = json.loads((tmp_path / "out" / "trace_stats.json").read_text())
    assert stats["counts"]["skipped"]["wrong_answer"] == stats["counts"]["records"] == 3
    assert stats["counts"]["traced"] == 0 and stats["groups"] == []
    assert (tmp_path / "out" / "traces.parquet").exists()


@pytest.mark.parametrize("corruption", ["replace", "noise"])
def test_every_constraint_of_a_multi_constraint_question_is_traced(tiny_llava_dir, planted_data_dir, tmp_path,
                                                                   corruption):
    """A question with a visual and a textual constraint is traced once per constraint, each corrupted in turn."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    assert run(["trace", "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--config",
                "multi_constraint", "--corruption", corruption, "--traced", "all", "--limit", "2", "--kinds", "mlp",
                "--noise-samples", "2", "--out", str(out), "--no-progress", "--dtype", "float32", "--device",
                "cpu"]) == 0
    rows = pq.read_table(out / "traces.parquet").to_pylist()
    units = {(row["id"], row["corrupted"]) for row in rows}
    assert len(units) == 2 * len({row["id"] for row in rows}) == 4

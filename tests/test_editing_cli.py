"""`vqa-constraints edit` end to end on a tiny LLaVA: outputs written, bad input is one clear line."""

from __future__ import annotations

import json

import pytest

from vqa_constraints.cli import run


@pytest.fixture(scope="module")
def tiny_llava_dir(tiny_model_dirs):
    return tiny_model_dirs("llava")


def test_edit_command_writes_all_outputs(tiny_llava_dir, planted_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = run(["edit", "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--method", "multedit,ft-l",
                "--track", "insertion", "--out", str(out), "--layers", "1", "--limit", "2",
                "--specificity-size", "4", "--key-position", "constraint", "--dtype", "float32", "--device", "cpu",
                "--sweep-layers", "0", "--validation-size", "2", "--neighbours", "2", "--corpus-keys", "256"])
    assert code == 0
    document = json.loads((out / "editing_results.json").read_text())
    assert set(document["methods"]) == {"multedit", "ft-l"}
    assert [row["layer"] for row in document["sweep"]["multedit"]] == [0]  # only the layers asked for
    assert document["options"]["key_position"] == "constraint"
    lines = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    assert sum(not line["sweep"] for line in lines) == 2 * document["methods"]["multedit"]["edits"]
    assert "| ft-l |" in capsys.readouterr().out
    # FT-L's bound was tuned on the validation split, and the record says so.
    tuned = document["choices"]["parameters"]["ft-l"]["linf_rms"]
    assert tuned["chosen"] in [float(v) for v in tuned["grid"]]
    assert document["methods"]["ft-l"]["config"]["linf_rms"] == tuned["chosen"]
    assert [c["baseline"] for c in document["comparisons"]] == ["ft-l"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("ft-l: [1, 2", "not valid YAML"),
        ("rome: {}", "unknown method 'rome'"),
        ("ft-l: {epsilon: 1}", "ft-l.epsilon: unknown hyper-parameter"),
        ("- ft", "expected a mapping"),
    ],
)
def test_bad_method_config_is_one_line_and_exit_1(tiny_llava_dir, planted_data_dir, tmp_path, capsys, text, message):
    config = tmp_path / "methods.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    code = run(["edit", "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--out", str(out),
                "--layers", "1", "--method-config", str(config), "--dtype", "float32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and str(config) in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "99"], "layer 99 is out of range"),
        (["--layers", "1", "--sweep-layers", "0,99"], "layer 99 is out of range"),
        (["--layers", "1", "--method", "rome"], "unknown method rome"),
        (["--layers", "1", "--batch-edits", "0"], "--batch-edits must be at least 1"),
        (["--layers", "1", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--trace-stats", "/nonexistent/trace_stats.json"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tiny_llava_dir, planted_data_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = run(["edit", "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--out", str(out),
                "--dtype", "float32", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_save_refuses_the_model_folder_itself(tiny_llava_dir, planted_data_dir, tmp_path, capsys):
    code = run(["edit", "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--out", str(tmp_path / "r"),
                "--layers", "1", "--limit", "1", "--specificity-size", "2", "--method", "ft",
                "--save", str(tiny_llava_dir), "--dtype", "float32", "--device", "cpu"])
    assert code == 1
    assert "model's own folder" in capsys.readouterr().err


def test_save_refuses_the_cache(tiny_llava_dir, planted_data_dir, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "zoo").mkdir(parents=True)
    monkeypatch.setenv("VQA_CONSTRAINTS_CACHE", str(cache))
    code = run(["edit", "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--out", str(tmp_path / "r"),
                "--layers", "1", "--limit", "1", "--method", "ft", "--save", str(cache), "--overwrite",
                "--dtype", "float32", "--device", "cpu"])
    assert code == 1
    assert "the vqa-constraints cache" in capsys.readouterr().err
    assert (cache / "zoo").is_dir()

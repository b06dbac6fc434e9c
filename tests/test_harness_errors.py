"""Bad input to `evaluate` / `merge`: one clear line on stderr, exit code 1, no traceback, nothing lost."""

from __future__ import annotations

import shutil

import pytest
from harness_support import LIMIT, planted_adapter, small_run  # noqa: F401  (session fixtures)

from vqa_constraints import cli


def run_cli(argv, capsys):
    capsys.readouterr()
    code = cli.run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return code, err, lines


def evaluate_args(model, data, out, *extra):
    return ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--limit", "2", "--no-progress", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "nonsense"], "--config 'nonsense': unknown config"),
        (["--split", "train"], "no split 'train'"),
        (["--shard", "3/3"], "--shard '3/3': I must be in 0..2"),
        (["--shard", "one"], "expected I/N"),
        (["--scoring", "beam"], "--scoring 'beam'"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--backend", "vllm"], "--backend vllm: vLLM is not installed"),
        (["--backend", "vllm", "--device-map", "auto"], "--backend vllm: vLLM is not installed"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size is for --backend vllm"),
    ],
)
def test_bad_options_are_one_line_errors(planted_model_dir, planted_data_dir, tmp_path, capsys, extra, message):
    code, err, lines = run_cli(evaluate_args(planted_model_dir, planted_data_dir, tmp_path / "run", *extra), capsys)
    assert code == 1
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_build(planted_model_dir, tmp_path, capsys):
    data = tmp_path / "not-a-build"
    data.mkdir()
    (data / "notes.txt").write_text("hello")
    code, err, lines = run_cli(evaluate_args(planted_model_dir, data, tmp_path / "run"), capsys)
    assert code == 1 and len(lines) == 1 and "not a VQA-Constraints build" in lines[0], err


def test_a_model_that_cannot_take_images(tiny_model_dirs, planted_data_dir, tmp_path, capsys):
    code, err, lines = run_cli(evaluate_args(tiny_model_dirs("text"), planted_data_dir, tmp_path / "run"), capsys)
    assert code == 1 and len(lines) == 1 and "text-only model" in lines[0], err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_another_evaluation(small_run, planted_model_dir, planted_data_dir, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    argv = evaluate_args(planted_model_dir, planted_data_dir, run, "--scoring", "generate")
    argv[argv.index("--limit") + 1] = str(LIMIT)
    code, err, lines = run_cli(argv, capsys)
    assert code == 1 and len(lines) == 1 and "scoring: stored 'both', now 'generate'" in lines[0], err
    assert (run / "samples.jsonl").read_bytes() == (small_run / "samples.jsonl").read_bytes()


def test_a_non_empty_folder_that_is_not_a_run(planted_model_dir, planted_data_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    code, err, lines = run_cli(evaluate_args(planted_model_dir, planted_data_dir, out), capsys)
    assert code == 1 and "not empty" in lines[0], err
    assert (out / "thesis.tex").read_text() == "keep me"


def test_merge_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    code, err, lines = run_cli(["merge", str(tmp_path / "x"), "--out", str(tmp_path / "m")], capsys)
    assert code == 1 and len(lines) == 1 and "not a run folder" in lines[0], err

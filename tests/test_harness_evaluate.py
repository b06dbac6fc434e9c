"""`evaluate` end to end on the planted model: outputs, reproducibility, batch invariance, resume, refusals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness_support import LIMIT, planted_adapter, run_options, small_run  # noqa: F401  (session fixtures)

from harness.evaluate import evaluate
from harness.runs import schema_errors
from harness.results import compute_metrics
from vqa_constraints import CONFIGS
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split


def read_samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_samples_follow_the_schema_and_the_data(small_run, planted_data_dir):
    samples = read_samples(small_run)
    assert len(samples) == LIMIT * len(CONFIGS)
    for number, sample in enumerate(samples, start=1):
        assert schema_errors("samples", sample, f"line {number}") == []
    # Question order: configs in order, rows in file order.
    expected = []
    for config in CONFIGS:
        split = load_split(str(planted_data_dir), config, "test")
        expected += [(config, r.id) for r in split.records(limit=LIMIT)]
    assert [(s["config"], s["id"]) for s in samples] == expected
    assert all(s["prediction"] is not None and s["gold_logprob"] is not None for s in samples)
    assert all(s["gold_logprob"] == max(s["answer_logprobs"]) for s in samples)
    assert "time" not in (small_run / "samples.jsonl").read_text()  # no timestamps: byte-reproducible


def test_results_record_provenance_and_metrics(small_run, planted_data_dir, planted_model_dir):
    results = results_of(small_run)
    assert schema_errors("results", results, "results.json") == []
    assert results["model"]["revision"].startswith("sha256:")
    assert results["model"]["dtype"] == "float32" and results["model"]["device"] == "cpu"
    assert results["options"]["batch_size"] == 8 and results["options"]["seed"] == 0
    assert results["package"]["version"]
    assert results["versions"]["torch"] and results["timing"]["seconds"] > 0
    for config in CONFIGS:
        split = load_split(str(planted_data_dir), config, "test")
        assert results["dataset"]["fingerprints"][config] == split.fingerprint
        assert results["dataset"]["sizes"][config] == len(split)
        assert results["metrics"][config]["n"] == LIMIT
    overall = results["metrics"]["all"]
    assert overall["n"] == LIMIT * len(CONFIGS)
    accuracy = overall["accuracy"]
    assert accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]
    assert accuracy["value"] >= 0.6  # the planted model knows its planted facts
    # Breakdowns partition the questions and agree with the samples.
    samples = read_samples(small_run)
    for breakdown in ("constraint_types", "num_constraints", "source", "relation"):
        assert sum(cell["n"] for cell in overall["by"][breakdown].values()) == overall["n"]
    both = [s for s in samples if s["constraint_types"] == "visual+textual"]
    assert overall["by"]["constraint_types"]["visual+textual"]["accuracy"]["value"] == pytest.approx(
        sum(s["correct"] for s in both) / len(both), abs=1e-6
    )


def test_bootstrap_intervals_are_seeded(small_run):
    samples = read_samples(small_run)
    first = compute_metrics(samples, list(CONFIGS), seed=0)
    assert compute_metrics(samples, list(CONFIGS), seed=0) == first
    assert results_of(small_run)["metrics"] == first
    other = compute_metrics(samples, list(CONFIGS), seed=1)
    assert other["all"]["accuracy"]["value"] == first["all"]["accuracy"]["value"]


def test_same_seed_gives_byte_identical_samples_and_batch_size_does_not_matter(
    small_run, planted_model_dir, planted_data_dir, planted_adapter, tmp_path
):
    again = evaluate(run_options(planted_model_dir, planted_data_dir, tmp_path / "again"), adapter=planted_adapter)
    assert (again / "samples.jsonl").read_bytes() == (small_run / "samples.jsonl").read_bytes()

    one = evaluate(run_options(planted_model_dir, planted_data_dir, tmp_path / "b1", batch_size=1), adapter=planted_adapter)
    for a, b in zip(read_samples(one), read_samples(small_run)):  # batch size 1 vs 8
        assert a["prediction"] == b["prediction"] and a["correct"] == b["correct"]
        assert a["gold_logprob"] == pytest.approx(b["gold_logprob"], abs=1e-4)
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)


def _interrupted_copy(small_run: Path, target: Path, keep: int, corrupt_middle: bool = False) -> None:
    """What a crash leaves: run.json, the first ``keep`` lines, half of the next line, no results.json."""
    target.mkdir()
    shutil.copy(small_run / "run.json", target / "run.json")
    lines = (small_run / "samples.jsonl").read_text().splitlines(keepends=True)
    kept = lines[:keep]
    if corrupt_middle:
        kept[1] = '{"id": "broken", "config"\n'
    (target / "samples.jsonl").write_text("".join(kept) + lines[keep][: len(lines[keep]) // 2])


@pytest.mark.parametrize("keep, corrupt_middle", [(4, False), (11, True)])
def test_resume_after_a_crash_gives_the_uninterrupted_files(
    small_run, planted_model_dir, planted_data_dir, planted_adapter, tmp_path, caplog, keep, corrupt_middle
):
    run = tmp_path / "crashed"
    _interrupted_copy(small_run, run, keep, corrupt_middle)
    with caplog.at_level(logging.WARNING, logger="harness.runs"):
        evaluate(run_options(planted_model_dir, planted_data_dir, run), adapter=planted_adapter)
    assert "incomplete or corrupt" in caplog.text
    assert (run / "samples.jsonl").read_bytes() == (small_run / "samples.jsonl").read_bytes()
    assert results_of(run)["metrics"] == results_of(small_run)["metrics"]


def test_killed_cli_run_resumes_to_identical_files(small_run, planted_model_dir, planted_data_dir, tmp_path):
    run = tmp_path / "killed"
    command = [
        str(Path(sys.executable).parent / "vqa-constraints"), "evaluate", "--model", str(planted_model_dir),
        "--data", str(planted_data_dir), "--out", str(run), "--limit", str(LIMIT), "--batch-size", "8", "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    samples = run / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if samples.exists() and samples.stat().st_size > 0:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert samples.exists() and not (run / "results.json").exists(), "the run finished before it could be killed"
    done_before = len(samples.read_text().splitlines())
    assert done_before < LIMIT * len(CONFIGS)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert samples.read_bytes() == (small_run / "samples.jsonl").read_bytes()
    assert results_of(run)["metrics"] == results_of(small_run)["metrics"]


@pytest.mark.parametrize(
    "change, field",
    [({"scoring": "generate"}, "scoring"), ({"limit": LIMIT + 1}, "limit"), ({"max_new_tokens": 3}, "max_new_tokens"),
     ({"seed": 1}, "seed"), ({"configs": ["single_constraint"]}, "configs")],
)
def test_refuses_to_mix_a_different_evaluation_into_a_run(
    small_run, planted_model_dir, planted_data_dir, planted_adapter, tmp_path, change, field
):
    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    before = (run / "samples.jsonl").read_bytes()
    with pytest.raises(UserError, match=field):
        evaluate(run_options(planted_model_dir, planted_data_dir, run, **change), adapter=planted_adapter)
    assert (run / "samples.jsonl").read_bytes() == before


def test_refuses_a_different_model(small_run, planted_data_dir, tiny_model_dirs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    with pytest.raises(UserError, match="model"):
        evaluate(run_options(tiny_model_dirs("llava"), planted_data_dir, run))


def test_logprob_only_and_generate_only_modes(planted_model_dir, planted_data_dir, planted_adapter, small_run, tmp_path):
    reference = {s["id"]: s for s in read_samples(small_run)}
    logprob = read_samples(evaluate(run_options(planted_model_dir, planted_data_dir, tmp_path / "lp", scoring="logprob", limit=2), adapter=planted_adapter))
    generate = read_samples(evaluate(run_options(planted_model_dir, planted_data_dir, tmp_path / "gen", scoring="generate", limit=2), adapter=planted_adapter))
    assert len(logprob) == len(generate) == 6
    for lp, gen in zip(logprob, generate):
        ref = reference[lp["id"]]
        assert lp["prediction"] is None and lp["correct"] is None
        assert lp["gold_logprob"] == pytest.approx(ref["gold_logprob"], abs=1e-4)
        assert gen["gold_logprob"] is None and gen["prediction"] == ref["prediction"]
        assert lp["confidence"] == pytest.approx(gen["confidence"], abs=1e-4)

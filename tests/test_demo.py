"""The quick demo end to end: report written, every linked figure present, numbers equal the run files'; the full
demo's steps for the flag models."""

from __future__ import annotations

import json
import re

import pytest

from harness.study.report import fmt, fmt_ci
from vqa_constraints.cli import run


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, planted_model_dir):
    out = tmp_path_factory.mktemp("demo") / "study"
    assert run(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_report_links_only_existing_figures(demo_dir):
    report = (demo_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 5, "accuracy, trace, attention and editing figures are all linked"
    for link in links:
        assert (demo_dir / link).is_file(), link
        assert (demo_dir / link).stat().st_size > 1000, f"{link} is not a real PNG"


def test_report_numbers_equal_run_files(demo_dir):
    report = (demo_dir / "report.md").read_text()
    runs = demo_dir / "runs"
    results = json.loads((runs / "planted-evaluate" / "results.json").read_text())
    for config in results["dataset"]["configs"]:
        cell = results["metrics"][config]
        assert f"| {config} | {cell['n']} | {fmt_ci(cell['accuracy'])} |" in report
    trace = json.loads((runs / "planted-trace-mllm" / "trace_stats.json").read_text())
    assert f"peak MLP layer {fmt(trace['peak_mlp_layer'])}" in report
    editing = json.loads((runs / "planted-edit" / "editing_results.json").read_text())
    for method, cell in editing["methods"].items():
        assert f"| {method} | {cell['edits']} |" in report
        efficacy = cell["efficacy"]
        assert f"{fmt(efficacy['mean'])} [{fmt(efficacy['ci_low'])}, {fmt(efficacy['ci_high'])}]" in report


def test_rerun_reuses_finished_steps(demo_dir):
    before = {p: p.stat().st_mtime_ns for p in (demo_dir / "runs").rglob("*.json")}
    assert run(["demo", "--quick", "--out", str(demo_dir)]) == 0
    after = {p: p.stat().st_mtime_ns for p in (demo_dir / "runs").rglob("*.json")}
    assert before == after


def test_findings_table_has_a_verdict_per_finding_and_quotes_the_run_files(demo_dir, planted_model_dir):
    report = (demo_dir / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| [1-5] \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3", "4", "5"]
    for row in rows:
        assert len(re.findall(r"\*\*(holds|does not hold|inconclusive|not tested)\*\*", row)) == 1, row  # planted only
    # Finding 1 on the planted model: not tested, since it holds no text-only facts (nothing to compare with), and
    # the evidence still shows the MLLM's peak at the planted layer (image-noise trace, last token).
    planted_layer = json.loads((planted_model_dir / "config.json").read_text())["planted_layer"]
    assert "**not tested**: no route" in rows[0]
    assert f"MLLM: peak MLP layer {planted_layer} " in rows[0]
    editing = json.loads((demo_dir / "runs" / "planted-edit" / "editing_results.json").read_text())
    for entry in editing.get("comparisons", []):
        if entry["method"] == "multedit" and entry["baseline"] in ("ft", "ft-l"):
            assert f"multedit − {entry['baseline']} {fmt(entry['difference'])}" in rows[4]


def test_full_study_traces_and_edits_both_flag_models(tmp_path):
    """The full demo runs flag-llava and flag-llava-direct on the same held-out questions; only the model that
    names the country first gets the recognition (subject) trace; finding 3's visual side is traced on the image."""
    from harness.study.demo import FULL, MODEL_SOURCE, model_steps

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 30}}))
    assert {"flag-llava", "flag-llava-direct"} <= set(FULL.models)
    names = {}
    for model in ("flag-llava", "flag-llava-direct"):
        assert MODEL_SOURCE[model] == "flags"
        steps = model_steps(model, tmp_path, tmp_path / "data", tmp_path / "runs", FULL, 0)
        names[model] = {step.name.removeprefix(model + "-") for step in steps}
        image = next(step for step in steps if step.name == f"{model}-trace-multi-image")
        assert image.argv[image.argv.index("--corruption") + 1] == "image-noise"
    assert "trace-mllm-subject" in names["flag-llava"] - names["flag-llava-direct"]
    assert names["flag-llava-direct"] >= {"edit", "edit-insertion", "trace-multi", "trace-multi-image", "attention",
                                          "trace-mllm-rome", "trace-text-only-rome"}


def test_full_study_repeats_accuracy_and_the_mllm_trace_on_the_training_countries(tmp_path):
    from harness.study.demo import FULL, TRAINING_STEPS, model_steps, training_steps

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 30}}))
    runs, heldout, training = tmp_path / "runs", tmp_path / "flags-heldout", tmp_path / "flags-training"
    judged = {step.name: step for step in model_steps("flag-llava", tmp_path, heldout, runs, FULL, 0)}
    repeated = training_steps("flag-llava", tmp_path, training, runs, FULL, 0)
    assert [step.name for step in repeated] == [f"flag-llava-{name}-training" for name in TRAINING_STEPS]
    for step in repeated:
        twin = judged[step.name.removesuffix("-training")]
        # the same command but for the questions and the folder
        swapped = {str(heldout): str(training), str(runs / twin.name): str(runs / step.name)}
        assert step.argv == [swapped.get(arg, arg) for arg in twin.argv]


def test_a_subject_build_made_for_other_subjects_is_refused(tmp_path):
    from harness.study.demo import run_subject_build, subject_build_step
    from vqa_constraints.errors import UserError

    step = subject_build_step(tmp_path, "flag-llava", "flags", ["Chad", "Peru"], "training", 0)
    data = run_subject_build(step, ["Chad", "Peru"], run)
    assert json.loads((data / "build_info.json").read_text())["subjects"] == ["Chad", "Peru"]
    assert run_subject_build(step, ["Peru", "Chad"], run) == data  # the same subjects: reused
    other = subject_build_step(tmp_path, "flag-llava-direct", "flags", ["Chad", "Mali"], "training", 0)
    with pytest.raises(UserError, match="built for other subjects"):
        run_subject_build(other, ["Chad", "Mali"], run)


def test_report_sets_training_countries_beside_the_held_out_ones(demo_dir, planted_model_dir, tmp_path):
    """Runs on a second set of questions ("-training" folders) get their own table, numbers from their files."""
    import shutil

    from harness.study.report import write_report

    study = tmp_path / "study"
    shutil.copytree(demo_dir, study)
    runs, data = study / "runs", study / "data" / "planted"
    common = ["--model", str(planted_model_dir), "--data", str(data), "--limit", "6", "--no-progress"]
    assert run(["evaluate", *common, "--config", "single_constraint", "--split", "validation",
                "--out", str(runs / "planted-evaluate-training")]) == 0
    assert run(["trace", *common, "--config", "single_constraint", "--split", "validation", "--corruption",
                "image-noise", "--positions", "last", "--kinds", "mlp", "--out",
                str(runs / "planted-trace-mllm-training")]) == 0
    report = write_report(study, models={"planted": str(planted_model_dir)}).read_text()
    assert "### Held-out and training countries" in report
    for label, suffix in (("held-out", ""), ("training", "-training")):
        cell = json.loads((runs / f"planted-evaluate{suffix}" / "results.json").read_text())["metrics"]["single_constraint"]
        trace = json.loads((runs / f"planted-trace-mllm{suffix}" / "trace_stats.json").read_text())
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} | "))
        assert row.startswith(f"| {label} | {fmt_ci(cell['accuracy'])} | {cell['n']} | "
                              f"{trace['counts']['traced']} of {trace['counts']['records']} |"), row


def test_demo_of_an_unknown_model_is_a_one_line_error_that_writes_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    assert run(["demo", "--quick", "--models", "planted,gpt-9", "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "gpt-9" in error and "flag-llava-direct" in error
    assert not out.exists()

"""The quick demo end to end: report written, every linked figure present, numbers equal the run files'."""

from __future__ import annotations

import json
import re

import pytest

from harness.report import fmt, fmt_ci
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

"""Interrupted trace / attention / edit runs write "complete": false, and every reader refuses such a document.

Interrupts are real: a forward pre-hook on the model's output head raises
KeyboardInterrupt (what Ctrl-C raises) at a chosen forward pass, and one test
sends SIGINT to a `vqa-constraints trace` process.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from editing.methods import weights_hash
from editing.runner import EditOptions, run_editing, validate_results
from harness.study import report
from harness.study.demo import Step, step_done
from harness.tracing import stats
from harness.tracing.attention_study import StudyOptions, run_attention_study, validate_stats
from harness.tracing.causal_trace import TraceOptions, run_trace
from vqa_constraints import cli
from vqa_constraints.errors import UserError
from vqa_constraints.loading import load_split

PARTIAL = r"wrote partial results \(complete: false\) to .*{name}; rerun the same command to redo it"


@contextmanager
def interrupt_at(adapter, call: int | None):
    """Count forward passes through the output head; raise KeyboardInterrupt at pass number ``call``."""
    count = [0]

    def hook(module, args):
        count[0] += 1
        if call is not None and count[0] >= call:
            raise KeyboardInterrupt

    handle = adapter.model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    code = cli.run([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def tiny_llava_dir(tiny_model_dirs):
    return tiny_model_dirs("llava")


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir):
    from harness.models.loading import load_model

    return load_model(tiny_llava_dir, dtype="float32", device="cpu")


def trace_options(model_dir, data_dir, out, **overrides) -> TraceOptions:
    # A random tiny model answers few questions right: trace every question, with its own top answer.
    base = dict(model=str(model_dir), data=str(data_dir), config="single_constraint", out=out, traced="all",
                corruption="image-noise", kinds=("mlp",), positions="last", limit=8, noise_samples=2,
                dtype="float32", device="cpu", progress=False, bootstrap=50)
    base.update(overrides)
    return TraceOptions(**base)


def test_an_interrupted_trace_is_partial_and_every_reader_refuses_it(
        tiny_llava, tiny_llava_dir, planted_data_dir, tmp_path, capsys):
    with interrupt_at(tiny_llava, None) as count:
        run_trace(trace_options(tiny_llava_dir, planted_data_dir, tmp_path / "full"), tiny_llava)
    full = json.loads((tmp_path / "full" / "trace_stats.json").read_text())
    assert full["complete"] is True
    assert full["data"]["files_sha256"] == load_split(str(planted_data_dir), "single_constraint").files_sha256

    runs = tmp_path / "runs"
    partial_dir = runs / "planted-trace-mllm"
    with interrupt_at(tiny_llava, count[0] * 3 // 4), \
            pytest.raises(KeyboardInterrupt, match=PARTIAL.format(name="trace_stats.json")):
        run_trace(trace_options(tiny_llava_dir, planted_data_dir, partial_dir), tiny_llava)
    path = partial_dir / "trace_stats.json"
    partial = json.loads(path.read_text())
    stats.validate(partial)
    assert partial["complete"] is False
    assert 0 < partial["counts"]["traced"] < full["counts"]["traced"]

    with pytest.raises(UserError, match=r"partial results \(complete: false\)"):
        stats.peak_mlp_layer(path)
    with pytest.raises(UserError, match="complete: false"):
        report.trace_section("planted", runs, tmp_path, planted_layer=None)
    step = Step("planted-trace-mllm", ["trace"], "trace_stats.json")
    assert not step_done(step, partial_dir)
    assert step_done(step, tmp_path / "full")
    code, err = run_cli(["edit", "--model", tiny_llava_dir, "--data", planted_data_dir, "--trace-stats", path,
                         "--out", tmp_path / "edit", "--limit", "1", "--dtype", "float32", "--device", "cpu"], capsys)
    assert code == 1 and err[-1].startswith("error: ") and "complete: false" in err[-1] and str(path) in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "edit" / "editing_results.json").exists()

    # Rerunning the same command redoes it from the start: the same numbers as the uninterrupted run.
    run_trace(trace_options(tiny_llava_dir, planted_data_dir, partial_dir), tiny_llava)
    redone = json.loads(path.read_text())
    assert redone["complete"] is True and redone["groups"] == full["groups"]
    assert stats.peak_mlp_layer(path) == full["peak_mlp_layer"]


def test_ctrl_c_on_the_trace_command_says_what_was_written(tiny_llava_dir, planted_data_dir, tmp_path):
    out = tmp_path / "trace"
    command = [sys.executable, "-c", "from vqa_constraints.cli import main; main()", "trace",
               "--model", str(tiny_llava_dir), "--data", str(planted_data_dir), "--config", "single_constraint",
               "--out", str(out), "--corruption", "image-noise", "--positions", "all", "--kinds", "mlp,attn,hidden",
               "--noise-samples", "2", "--traced", "all", "--limit", "200", "--engine", "reference",
               "--dtype", "float32", "--device", "cpu"]
    # A trace of minutes (the reference engine, every position and kind), so the signal always finds it running.
    # A shell that starts the suite in the background ignores SIGINT, and the child would inherit that and never
    # see the signal: give it the default disposition, as a terminal's Ctrl-C would find.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    try:
        # Wait until the progress bar shows restorations done: the trace loop is running.
        while not re.search(rb"tracing: *[1-9]|tracing:[^\r\n]*\| *[1-9][0-9]*/", seen):
            chunk = process.stderr.read1(4096)
            assert chunk, f"trace ended before tracing started: {seen.decode(errors='replace')[-2000:]}"
            seen += chunk
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    lines = (seen + rest).decode().replace("\r", "\n").strip().splitlines()
    assert process.returncode == 130
    assert lines[-1] == (f"interrupted: wrote partial results (complete: false) to {out / 'trace_stats.json'}; "
                         "rerun the same command to redo it")
    assert json.loads((out / "trace_stats.json").read_text())["complete"] is False


def test_an_empty_replace_token_writes_nothing(tiny_llava_dir, planted_data_dir, tmp_path, capsys):
    out = tmp_path / "trace"
    code, err = run_cli(["trace", "--model", tiny_llava_dir, "--data", planted_data_dir, "--config",
                         "single_constraint", "--out", out, "--corruption", "replace", "--replace-token", "",
                         "--no-progress"], capsys)
    assert code == 1 and err[-1].startswith("error: --replace-token") and "Traceback" not in "\n".join(err)
    assert not (out / "trace_stats.json").exists()


def test_an_interrupted_attention_study_is_partial_and_refused(tiny_llava, planted_data_dir, tmp_path):
    split = load_split(str(planted_data_dir), "single_constraint")
    options = StudyOptions(limit=6, top_k=2, draws=2, progress=False)
    with interrupt_at(tiny_llava, None) as count:
        full = run_attention_study(tiny_llava, split, tmp_path / "full", options)
    assert full["complete"] is True and full["data_files_sha256"] == split.files_sha256

    partial_dir = tmp_path / "planted-attention"
    with interrupt_at(tiny_llava, count[0] - 1), \
            pytest.raises(KeyboardInterrupt, match=PARTIAL.format(name="attention_stats.json")):
        run_attention_study(tiny_llava, split, partial_dir, options)
    partial = json.loads((partial_dir / "attention_stats.json").read_text())
    validate_stats(partial)
    assert partial["complete"] is False
    assert 0 < partial["counts"]["analysed"] < full["counts"]["analysed"]
    with pytest.raises(UserError, match="complete: false"):
        report.attention_section("planted", partial_dir, tmp_path)
    assert not step_done(Step("planted-attention", ["attention"], "attention_stats.json"), partial_dir)


def test_an_interrupted_edit_is_partial_and_refused(tiny_llava, planted_data_dir, tmp_path):
    options = EditOptions(methods=["multedit", "ft-l"], track="insertion", layers=[1], limit=2, specificity_size=4,
                          key_position="constraint")
    before = weights_hash(tiny_llava.model)
    with interrupt_at(tiny_llava, None) as count:
        run_editing(tiny_llava, str(planted_data_dir), tmp_path / "full", options)
    full = json.loads((tmp_path / "full" / "editing_results.json").read_text())
    assert full["complete"] is True and set(full["methods"]) == {"multedit", "ft-l"}
    assert full["data"]["files_sha256"] == load_split(str(planted_data_dir), full["data"]["config"]).files_sha256

    partial_dir = tmp_path / "planted-edit"
    with interrupt_at(tiny_llava, count[0] - 1), \
            pytest.raises(KeyboardInterrupt, match=PARTIAL.format(name="editing_results.json")):
        run_editing(tiny_llava, str(planted_data_dir), partial_dir, options)
    partial = json.loads((partial_dir / "editing_results.json").read_text())
    validate_results(partial)
    assert partial["complete"] is False
    assert set(partial["methods"]) == {"multedit"}  # ft-l was cut short
    for key in ("edits", "efficacy", "generalization", "specificity", "logprob_gain"):
        assert partial["methods"]["multedit"][key] == full["methods"]["multedit"][key], key
    assert weights_hash(tiny_llava.model) == before  # the interrupted edit was undone
    with pytest.raises(UserError, match="complete: false"):
        report.editing_section("planted", partial_dir, tmp_path / "no-sweep", tmp_path)
    assert not step_done(Step("planted-edit", ["edit"], "editing_results.json"), partial_dir)

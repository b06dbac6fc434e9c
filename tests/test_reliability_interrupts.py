"""Ctrl-C at any moment is one line and exit 130; an older complete document never passes for this run's; SIGKILL's
leftover ``*.tmp`` files are ignored by readers and removed by the next run; an empty shard slice is a shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.outputs import StaleDocuments
from vqa_constraints.errors import UserError
from vqa_constraints.cli import run

LAUNCH = "import sys; from vqa_constraints.cli import main; sys.argv[0] = 'vqa-constraints'; main()"


def _trace_argv(model, data, out, *extra) -> list[str]:
    return ["trace", "--model", str(model), "--data", str(data), "--config", "single_constraint", "--limit", "4",
            "--kinds", "mlp", "--traced", "all", "--no-progress", "--dtype", "float32", "--device", "cpu",
            "--out", str(out), *extra]


def test_ctrl_c_at_any_moment_is_one_line_exit_130_and_leaves_no_older_complete_document(
        tiny_model_dirs, planted_data_dir, tmp_path):
    model = tiny_model_dirs("llava")
    out = tmp_path / "trace"
    # An earlier, finished run of another command line into the same --out.
    assert run(_trace_argv(model, planted_data_dir, out, "--window", "2")) == 0
    older = json.loads((out / "trace_stats.json").read_text())
    assert older["complete"] is True
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    seen = []
    # While Python imports the commands; then the moment the model starts loading, and a little after it.
    for moment in ("imports", 0.0, 0.3, 1.0):
        line, document = _interrupt(_trace_argv(model, planted_data_dir, out), env, moment)
        seen.append(line)
        if line is None:  # finished before the signal: its own complete document
            assert document["complete"] is True and document["options"]["window"] == 1
        elif "before the command started" in line:  # nothing was touched
            assert moment == "imports" and document == older
        else:  # never the older command line's finished result as if it were this one's
            assert document["complete"] is not True or document["options"]["window"] == 1, (moment, line)
    assert sum(line is not None and "before the command started" not in line for line in seen) >= 2, seen


def _interrupt(argv: list[str], env: dict, moment) -> tuple[str | None, dict]:
    """Run the CLI in a child process and send it SIGINT at ``moment``: "imports" (0.2 s after start) or that many
    seconds after it starts loading the model; (its one interrupted: line or None when it finished, the document)."""
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env)
    err = b""
    if moment == "imports":
        time.sleep(0.2)
    else:
        while b"Loading weights" not in err and process.poll() is None:
            err += os.read(process.stderr.fileno(), 4096)
        time.sleep(moment)
    process.send_signal(signal.SIGINT)
    err = (err + process.stderr.read()).decode()
    process.wait(timeout=300)
    assert "Traceback" not in err, (moment, err)
    document = json.loads((Path(argv[argv.index("--out") + 1]) / "trace_stats.json").read_text())
    if process.returncode == 0:
        return None, document
    assert process.returncode == 130, (moment, process.returncode, err)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(("interrupted:", "error:"))]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    return lines[0], document


def test_an_early_ctrl_c_marks_the_older_document_partial(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    document = {"complete": True, "options": {"window": 2}}
    (out / "attention_stats.json").write_text(json.dumps(document))
    with pytest.raises(KeyboardInterrupt, match="marked the earlier .* complete: false"):
        with StaleDocuments(out, "attention"):
            raise KeyboardInterrupt
    assert json.loads((out / "attention_stats.json").read_text()) == {**document, "complete": False}
    # A run that wrote its own (partial) document before the interrupt keeps it as written.
    (out / "attention_stats.json").write_text(json.dumps({"complete": False, "mine": True}))
    with pytest.raises(KeyboardInterrupt):
        with StaleDocuments(out, "attention"):
            (out / "attention_stats.json").write_text(json.dumps({"complete": True, "mine": 2}))
            raise KeyboardInterrupt
    assert json.loads((out / "attention_stats.json").read_text()) == {"complete": True, "mine": 2}
    # Any other error leaves everything alone.
    with pytest.raises(ValueError):
        with StaleDocuments(out, "attention"):
            raise ValueError("not an interrupt")
    assert json.loads((out / "attention_stats.json").read_text())["complete"] is True


def test_sigkill_leftovers_are_ignored_by_readers_and_removed_by_the_next_run(tiny_model_dirs, planted_data_dir,
                                                                            tmp_path):
    model = tiny_model_dirs("llava")
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, folder in enumerate(shards):
        assert run(_trace_argv(model, planted_data_dir, folder, "--shard", f"{i}/2")) == 0
    # What a SIGKILL in the middle of an atomic write leaves: 0-byte temporary files next to the real ones.
    leftovers = [shards[0] / ".trace_stats.json.tmp", shards[0] / "traces.parquet.tmp", shards[1] / "plot.tmp.png"]
    for path in leftovers:
        path.write_bytes(b"")
    assert run(["merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0  # readers ignore them
    assert not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in (tmp_path / "merged").iterdir())
    assert run(_trace_argv(model, planted_data_dir, shards[0], "--shard", "0/2")) == 0  # the next run removes them
    assert not leftovers[0].exists() and not leftovers[1].exists()
    # A folder holding only leftovers is empty for every command's --out rule.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".run.json.tmp").write_bytes(b"")
    assert run(["evaluate", "--model", str(model), "--data", str(planted_data_dir), "--config", "single_constraint",
                "--limit", "2", "--scoring", "generate", "--max-new-tokens", "2", "--no-progress", "--device", "cpu",
                "--dtype", "float32", "--out", str(fresh)]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["results.json", "run.json", "samples.jsonl"]


@pytest.mark.parametrize("command", ["evaluate", "trace", "attention"])
def test_an_empty_shard_slice_is_an_empty_mergeable_shard(command, tiny_model_dirs, planted_data_dir, tmp_path):
    """More shards than questions (e.g. more ranks than questions): the empty slices are shards like the others."""
    model = tiny_model_dirs("llava")
    common = ["--model", str(model), "--data", str(planted_data_dir), "--config", "single_constraint", "--limit", "2",
              "--no-progress", "--device", "cpu", "--dtype", "float32"]
    extra = {"evaluate": ["--scoring", "generate", "--max-new-tokens", "2"],
             "trace": ["--kinds", "mlp", "--traced", "all"], "attention": ["--draws", "1"]}[command]
    document = {"evaluate": "samples.jsonl", "trace": "traces.parquet", "attention": "attention_examples.parquet"}
    shards = [tmp_path / f"shard{i}" for i in range(5)]  # 2 questions over 5 shards: three are empty
    for i, folder in enumerate(shards):
        assert run([command, *common, *extra, "--shard", f"{i}/5", "--out", str(folder)]) == 0, i
    assert (shards[0] / document[command]).exists()
    assert run([command, *common, *extra, "--out", str(tmp_path / "all")]) == 0
    assert run(["merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    if command == "attention":  # equal up to the per-run fields; its rows are compared elsewhere
        left = json.loads((tmp_path / "merged" / "attention_stats.json").read_text())
        right = json.loads((tmp_path / "all" / "attention_stats.json").read_text())
        assert left["counts"] == right["counts"] and left["per_layer"] == right["per_layer"]
    else:
        name = "samples.jsonl" if command == "evaluate" else "trace_stats.json"
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()
        assert (tmp_path / "merged" / document[command]).stat().st_size > 0


@pytest.mark.parametrize("raised, prefix, code", [(KeyboardInterrupt("stopped"), "interrupted:", 130),
                                                  (UserError("data.parquet row 3: bad field"), "error:", 1),
                                                  (ValueError("a bug"), "error:", 70)])
def test_the_one_line_starts_its_own_line_after_a_half_drawn_progress_bar(raised, prefix, code, capsys):
    """An interrupt or error leaves a hand-updated tqdm bar (as transformers' "Loading weights") open mid-line; the
    message must not trail it."""
    from tqdm.auto import tqdm

    from vqa_constraints.cli import dispatch

    def command(args):
        bar = tqdm(total=10, desc="Loading weights")
        bar.update(3)
        raise raised

    assert dispatch(command, None) == code
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if prefix in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), err


def test_a_ctrl_c_inside_a_finaliser_is_delivered_again_not_printed_and_lost(capsys):
    """A Ctrl-C can land while the garbage collector finalises a generator (transformers' "Loading weights" loop):
    Python would print "Exception ignored" with a traceback and drop it; the CLI's hook delivers it again."""
    from vqa_constraints.cli import _unraisable

    def loop():
        try:
            yield 1
        finally:
            raise KeyboardInterrupt  # the signal, arriving in the loop's clean-up

    previous = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous)
    delivered = False
    try:
        generator = loop()
        next(generator)
        del generator  # finalised here: the KeyboardInterrupt is unraisable
        try:
            time.sleep(2)
        except KeyboardInterrupt:
            delivered = True
    finally:
        sys.unraisablehook = previous
    assert delivered
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err

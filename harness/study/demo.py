"""`vqa-constraints demo`: the whole study in one command.

Builds each model's own questions (planted / flags), builds (or reuses) the zoo models, evaluates them,
traces them (with the image and as a text-only LLM), measures attention
contributions, runs the editing track and writes ``report.md``.

Every step is an ordinary subcommand run through the same CLI a user types
(the printed command lines can be copied; the command hands ``run_demo`` the
dispatcher's ``run``), writing into its own run folder
under ``DIR/runs``. A step whose output is finished is reused, so an
interrupted demo continues where it stopped: trace, attention and edit
outputs count only when marked ``"complete": true`` (an interrupted one is
redone); evaluate's results.json and a build's README.md are written only
when finished.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from harness.outputs import is_complete
from harness.study.controls import run_controls
from harness.study.report import write_report
from harness.zoo import flag_llava, planted
from vqa_constraints.errors import UserError

# Runs one command line (without the program name) and returns its exit code: the CLI's dispatcher.
RunCommand = Callable[[list[str]], int]

console = Console(stderr=True)


@dataclass(frozen=True)
class DemoSize:
    """How much of the study to run: --quick is what CI runs (planted model only)."""

    models: tuple[str, ...]
    eval_limit: int | None
    trace_limit: int
    attention_limit: int
    edit_limit: int
    specificity_size: int
    sweep_limit: int  # edit requests in the layer sweep, which repeats every edit at every swept layer
    sweep_max_layers: int  # a deeper model is swept at evenly spaced layers
    # Also trace MLLM and text-only LM with ROME's window (scaled to depth): finding 1 under both windows.
    rome_window: bool = False
    # flag-llava's edits cost ~30 s each on 2 cores (every specificity question re-answered in 24 tokens after
    # every edit, four methods, two tracks): it gets its own, smaller editing budget.
    flag_edit_limit: int = 8
    flag_specificity_size: int = 16
    flag_sweep_limit: int = 2
    flag_sweep_max_layers: int = 6

    def for_model(self, model_name: str) -> "DemoSize":
        if model_name == "planted":
            return self
        return replace(self, edit_limit=self.flag_edit_limit, specificity_size=self.flag_specificity_size,
                       sweep_limit=self.flag_sweep_limit, sweep_max_layers=self.flag_sweep_max_layers)


QUICK = DemoSize(models=("planted",), eval_limit=60, trace_limit=24,
                 attention_limit=24, edit_limit=8, specificity_size=16, sweep_limit=4, sweep_max_layers=10)
# flag-llava answers about half of its held-out questions correctly and only those are traced, so its traces look
# at 120 questions to trace ~55.
FULL = DemoSize(models=("planted", "flag-llava", "flag-llava-direct"), eval_limit=200, trace_limit=120,
                attention_limit=60, edit_limit=12, specificity_size=32, sweep_limit=3, sweep_max_layers=10,
                rome_window=True)


# Each model is studied on the questions of its own world: the planted model has never seen a flag, and
# flag-llava has never seen a planted creature.
MODEL_SOURCE = {"planted": "planted", "flag-llava": "flags", "flag-llava-direct": "flags"}


def sweep_layers(model_dir: Path, max_layers: int) -> str:
    """Every layer of a shallow model; about ``max_layers`` evenly spaced ones of a deep one."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    count = config.get("text_config", config)["num_hidden_layers"]
    stride = -(-count // max_layers)
    return ",".join(str(layer) for layer in range(0, count, stride))


@dataclass
class Step:
    name: str  # also the run folder's name under DIR/runs
    argv: list[str]  # a `vqa-constraints` command line
    output: str  # the file whose presence means the step is done
    seconds: float | None = None
    reused: bool = False
    notes: dict = field(default_factory=dict)


def model_steps(model_name: str, model_dir: Path, data: Path, runs: Path, size: DemoSize, seed: int) -> list[Step]:
    """The evaluate / trace / attention / edit steps for one zoo model."""
    size = size.for_model(model_name)
    model, data_arg, seed_arg = str(model_dir), str(data), str(seed)
    common = ["--model", model, "--data", data_arg, "--seed", seed_arg]

    def limit(value):
        return [] if value is None else ["--limit", str(value)]

    # Sentence answers ("The capital of Nepal is Kathmandu.") need 24 new tokens to be scored; the planted model's
    # bare ones 16. Traces keep 16: they only locate where the answer starts, which the tuned flag-llava says within
    # its first 16 tokens (18 of 371 held-out answers reach 15 tokens).
    answer_tokens = ["--max-new-tokens", "16" if model_name == "planted" else "24"]
    steps = [
        Step(f"{model_name}-evaluate",
             ["evaluate", *common, "--out", str(runs / f"{model_name}-evaluate"), *limit(size.eval_limit),
              *answer_tokens, "--no-progress"],
             "results.json"),
    ]
    if model_name == "planted":
        # The planted model reads the picture from the final token (see the
        # tracing section of the README), so the image itself is corrupted.
        mllm_trace = ["--corruption", "image-noise", "--positions", "last"]
        text_trace = ["--corruption", "noise", "--positions", "constraint"]
        edit_track, key_position = "insertion", "last"
    else:
        mllm_trace = ["--corruption", "replace", "--positions", "constraint"]
        text_trace = ["--corruption", "replace", "--positions", "constraint"]
        # Key position: the most distinct key at the traced layer (auto).
        edit_track, key_position = "correction", "auto"
    # The edited layer: the MLLM trace's peak causal MLP layer. flag-llava's traces find none at the constraint
    # tokens (the answer is read from the country name it says first; docs/tracing.md), so its edits use layer 9
    # of 30, where its earlier editing measurements were made; the output records that --layers chose it.
    edit_layer = (["--trace-stats", str(runs / f"{model_name}-trace-mllm" / "trace_stats.json")]
                  if model_name == "planted" else ["--layers", "9"])
    edit_common = ["--key-position", key_position, *answer_tokens, *edit_layer, "--specificity-size", str(size.specificity_size)]
    # Both sides of finding 1's comparison are traced with the same corruption family and the same window: the
    # paper's window 1 and, in the full study, ROME's window scaled to depth ("-rome" runs, MLP only).
    windows = [("", "1", "hidden,mlp,attn")] + ([("-rome", "rome", "mlp")] if size.rome_window else [])
    for suffix, window, kinds in windows:
        steps += [
            Step(f"{model_name}-trace-mllm{suffix}",
                 ["trace", *common, "--config", "single_constraint", *mllm_trace, "--kinds", kinds, "--window", window,
                  "--out", str(runs / f"{model_name}-trace-mllm{suffix}"), *limit(size.trace_limit), "--no-progress"],
                 "trace_stats.json"),
            Step(f"{model_name}-trace-text-only{suffix}",
                 ["trace", *common, "--config", "single_constraint", "--text-only", *text_trace, "--kinds", kinds,
                  "--window", window, "--out", str(runs / f"{model_name}-trace-text-only{suffix}"),
                  *limit(size.trace_limit), "--no-progress"],
                 "trace_stats.json"),
        ]
    steps += [
        Step(f"{model_name}-trace-multi",
             ["trace", *common, "--config", "multi_constraint", "--corruption", "noise", "--positions", "constraint",
              "--kinds", "mlp", "--out", str(runs / f"{model_name}-trace-multi"), *limit(size.trace_limit),
              "--no-progress"],
             "trace_stats.json"),
        # Finding 3's visual side: noise on the image the visual constraint refers to (a model that reads the
        # picture where it answers is untouched by noise on the constraint's words). Same window as the run above.
        Step(f"{model_name}-trace-multi-image",
             ["trace", *common, "--config", "multi_constraint", "--corruption", "image-noise", "--positions",
              "constraint", "--kinds", "mlp", "--out", str(runs / f"{model_name}-trace-multi-image"),
              *limit(size.trace_limit), "--no-progress"],
             "trace_stats.json"),
        Step(f"{model_name}-attention",
             ["attention", *common, "--config", "single_constraint", "--out", str(runs / f"{model_name}-attention"),
              *limit(size.attention_limit), *answer_tokens, "--no-progress"],
             "attention_stats.json"),
        Step(f"{model_name}-edit",
             ["edit", *common, "--method", "multedit,multedit-cov,ft,ft-l", "--track", edit_track, *edit_common,
              "--key-stats-size", "32",
              *limit(size.edit_limit), "--out", str(runs / f"{model_name}-edit")],
             "editing_results.json"),
    ]
    if model_name == "flag-llava":
        # flag-llava names the country before answering: trace that recognition step too.
        steps += [
            Step(f"{model_name}-trace-mllm-subject",
                 ["trace", *common, "--config", "single_constraint", *mllm_trace, "--target", "subject",
                  "--kinds", "hidden,mlp", "--out", str(runs / f"{model_name}-trace-mllm-subject"),
                  *limit(size.trace_limit), "--no-progress"],
                 "trace_stats.json"),
        ]
    if model_name != "planted":
        # the flag models are edited on both tracks
        steps += [
            Step(f"{model_name}-edit-insertion",
                 ["edit", *common, "--method", "multedit,multedit-cov,ft,ft-l", "--track", "insertion", *edit_common,
                  "--key-stats-size", "32", *limit(size.edit_limit), "--out", str(runs / f"{model_name}-edit-insertion")],
                 "editing_results.json"),
        ]
    steps += [
        # The sweep repeats every edit at every swept layer: MultEdit alone, on fewer edits, keeps it affordable.
        Step(f"{model_name}-edit-sweep",
             ["edit", *common, "--method", "multedit", "--track", edit_track, *edit_common, *limit(size.sweep_limit),
              "--sweep-layers", sweep_layers(model_dir, size.sweep_max_layers), "--out", str(runs / f"{model_name}-edit-sweep")],
             "editing_results.json"),
    ]
    return steps


# Outputs that an interrupted run writes too, marked "complete": false (harness/outputs.py).
MARKED_OUTPUTS = ("trace_stats.json", "attention_stats.json", "editing_results.json")


def step_done(step: Step, folder: Path) -> bool:
    path = folder / step.output
    if step.output in MARKED_OUTPUTS and path.exists() and not is_complete(path):
        console.print(f"[yellow]{path} is partial (an interrupted run): redoing {step.name}[/yellow]")
        return False
    return path.exists()


def run_step(step: Step, folder: Path, run: RunCommand) -> None:
    """Run one subcommand through ``run`` (the CLI), unless ``folder`` already holds its finished output."""
    if step_done(step, folder):
        step.reused = True
        console.print(f"[dim]reusing {folder}[/dim]")
        return
    console.rule(f"[bold]{step.name}")
    console.print(f"$ vqa-constraints {shlex.join(step.argv)}", highlight=False)
    started = time.perf_counter()
    code = run(step.argv)
    step.seconds = time.perf_counter() - started
    if code == 130:  # the CLI's exit code for Ctrl-C; that step wrote partial results, or none
        raise KeyboardInterrupt(f"demo step {step.name!r} was interrupted; rerun the demo: finished steps are reused, "
                                "that one is redone")
    if code != 0:
        raise UserError(f"demo step {step.name!r} failed (exit {code}); fix the error above and rerun to continue")


def build_zoo_model(name: str, quick: bool) -> Path:
    if name == "planted":
        return Path(planted.build(planted.DEFAULT_RECIPE))
    if name == "flag-llava-direct":  # answers bare ("Kabul."): the model where retrieval can be traced latent
        return Path(flag_llava.build(flag_llava.DIRECT_RECIPE))
    return Path(flag_llava.build(flag_llava.DEFAULT_RECIPE))


def tuning_subjects(model_dir: Path, which: str) -> list[str]:
    """The subjects a zoo model was tuned on (``which`` = "training") or never saw a question on ("heldout"):
    flag-llava's countries; none for the others."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return list(config.get("vqa_constraints", {}).get(f"{which}_countries", []))


# What the full study repeats on a tuned model's training countries, beside the held-out ones it is judged on:
# accuracy and the MLLM trace at window 1 (run folders named "<step>-training").
TRAINING_STEPS = ("evaluate", "trace-mllm")


def subject_build_step(out: Path, name: str, source: str, subjects: list[str], which: str, seed: int) -> Step:
    """The dataset build of ``source`` restricted to ``subjects`` (a model's ``which`` countries)."""
    data = out / "data" / f"{source}-{which}"
    subjects_file = out / "data" / f"{name}-{which}-subjects.txt"
    subjects_file.parent.mkdir(parents=True, exist_ok=True)
    subjects_file.write_text("".join(f"{subject}\n" for subject in subjects), "utf-8")
    return Step(f"dataset-{data.name}", ["build", "--out", str(data), "--sources", source, "--seed", str(seed),
                                         "--subjects", str(subjects_file)], "README.md")


def run_subject_build(step: Step, subjects: list[str], run: RunCommand) -> Path:
    """Run a ``subject_build_step`` (models with the same split share it); a build already there for other
    subjects is refused, not reused."""
    data = Path(step.argv[step.argv.index("--out") + 1])
    info = data / "build_info.json"
    if info.exists() and set(json.loads(info.read_text()).get("subjects") or ()) != set(subjects):
        raise UserError(f"{data}: built for other subjects than {step.argv[-1]} lists; remove it or use another --out")
    run_step(step, data, run)
    return data


def training_steps(model_name: str, model_dir: Path, data: Path, runs: Path, size: DemoSize, seed: int) -> list[Step]:
    """``TRAINING_STEPS`` of ``model_steps`` on ``data`` (the training countries' build), each in its own
    "-training" folder."""
    steps = []
    for step in model_steps(model_name, model_dir, data, runs, size, seed):
        if step.name.removeprefix(f"{model_name}-") in TRAINING_STEPS:
            name = f"{step.name}-training"
            argv = [str(runs / name) if arg == str(runs / step.name) else arg for arg in step.argv]
            steps.append(Step(name, argv, step.output))
    return steps


def run_demo(out: Path, run: RunCommand, quick: bool = False, seed: int = 0,
             models: tuple[str, ...] | None = None) -> Path:
    """Run the study's steps (``models``: only these zoo models, default the size's) into ``out`` and write its
    report."""
    size = QUICK if quick else FULL
    if models is not None:
        unknown = [name for name in models if name not in MODEL_SOURCE]
        if unknown or not models:
            raise UserError(f"--models {','.join(unknown) or '(empty)'}: not a demo model (demo models: "
                            f"{', '.join(MODEL_SOURCE)})")
        size = replace(size, models=tuple(models))
    out = Path(out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    all_steps: list[Step] = []

    built: dict[str, Path] = {}
    for name in size.models:
        console.rule(f"[bold]zoo: {name}")
        started = time.perf_counter()
        built[name] = build_zoo_model(name, quick)
        all_steps.append(Step(f"zoo-{name}", ["zoo", "build", name], "config.json",
                              seconds=time.perf_counter() - started))
        source = MODEL_SOURCE[name]
        heldout = tuning_subjects(built[name], "heldout")
        if heldout:
            # A model tuned on some subjects is judged on the others (it never saw a question on them).
            build_step = subject_build_step(out, name, source, heldout, "heldout", seed)
            data = run_subject_build(build_step, heldout, run)
        else:
            data = out / "data" / source
            build_step = Step(f"dataset-{source}", ["build", "--out", str(data), "--sources", source, "--seed",
                                                    str(seed)], "README.md")
            run_step(build_step, data, run)
        all_steps.append(build_step)
        for step in model_steps(name, built[name], data, runs, size, seed):
            run_step(step, runs / step.name, run)
            all_steps.append(step)
        training = tuning_subjects(built[name], "training")
        if heldout and training and not quick:
            # ... and measured on its training countries too, reported beside the held-out ones.
            build_step = subject_build_step(out, name, source, training, "training", seed)
            data = run_subject_build(build_step, training, run)
            all_steps.append(build_step)
            for step in training_steps(name, built[name], data, runs, size, seed):
                run_step(step, runs / step.name, run)
                all_steps.append(step)

    if not quick:
        # The controls' verdicts stand beside the models' in the findings table (harness/study/controls.py).
        console.rule("[bold]ground-truth controls")
        started = time.perf_counter()
        run_controls(out / "controls", seed=seed)
        all_steps.append(Step("controls", ["controls", "--out", str(out / "controls")], "controls.json",
                              seconds=time.perf_counter() - started))
    report = write_report(out, models={k: str(v) for k, v in built.items()}, steps=all_steps, quick=quick)
    print_summary(all_steps, report)
    return report


def print_summary(steps: list[Step], report: Path) -> None:
    table = Table(title="vqa-constraints demo")
    table.add_column("step")
    table.add_column("time")
    for step in steps:
        when = "reused" if step.reused else (f"{step.seconds:.1f} s" if step.seconds is not None else "")
        table.add_row(step.name, when)
    console.print(table)
    console.print(f"report: {report}")

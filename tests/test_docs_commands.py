"""The commands shown in README.md and docs/ run as written, and the README's links resolve (issue #14).

Every `vqa-constraints ...` line inside a fenced block of README.md or docs/**/*.md is extracted afresh on each run, so a
command removed from the docs disappears from here and a command added is checked at once.

- Every extracted command is parsed by the real CLI parser: a misspelt or removed flag fails.
- Commands that need only bundled data are also run, in-process through `vqa_constraints.cli.run`, in a temporary
  working folder, each distinct command once, with these substitutions (documented in docs/development.md):
  * `$(vqa-constraints zoo build planted)` and `--model models/planted` -> the planted zoo model (conftest);
  * a `--data` value, or the positional build of `validate` / `info` / `publish`, under `data/` or `study/data/`
    -> the small prebuilt planted build (conftest);
  * `evaluate`, `trace`, `attention`, `edit` get small limits (LIMITS below), added or overriding the doc's;
  * `controls` gets `--limit 12` (12 questions or edits per model);
  * `build` without `--sources` builds only `planted`; a `zoo build` of another model than planted gets `--quick`
    (planted `--quick` is the recipe tests/test_zoo_planted.py builds too); an absolute `--out` lands in the
    temporary folder.
  * a GPU-sized or slow model (a Hub id such as `llava-hf/llava-1.5-7b-hf`, a placeholder such as `MODEL`, a
    zoo folder or a model another page builds) -> the planted model as a stand-in; a placeholder `--data`
    (`DIR`, `DIR_OR_REPO_ID`) -> the planted build;
  * a SLURM array line (`--shard ${SLURM_ARRAY_TASK_ID}/N`) runs once per task, then the page's `merge` with its
    glob expanded, in one folder (test_shard_arrays_and_merge_run_on_a_stand_in).
- Not run (parsed only): uploads without `--dry-run`, the paper's files, zoo builds of another seed, and the
  commands in NOT_RUN (each with its reason).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from vqa_constraints.cli import build_parser, run
from vqa_constraints.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

PLANTED_MODEL_SUBST = "$(vqa-constraints zoo build planted)"
PLANTED_MODEL = "PLANTED_MODEL"  # what the substitution gives before the model is known
MODEL_ALIASES = {PLANTED_MODEL, "models/planted"}
DATA_PREFIXES = ("data/", "study/data/")  # the builds the docs make; the test reads the prebuilt one instead
DATA_POSITIONAL = {"validate", "info", "publish"}  # commands whose first positional argument is a build
LIMITS = {
    "evaluate": {"--limit": "2"},
    "trace": {"--limit": "2"},
    "attention": {"--limit": "2", "--draws": "1"},
    "edit": {"--limit": "2", "--trace-limit": "4", "--specificity-size": "4"},
    "controls": {"--limit": "12"},
}
NOT_RUN = {
    ("demo",): "the quick demo is tests/test_demo.py; the full one takes over 20 minutes",
    ("leaderboard", "prepare"): "needs a full evaluation of the release build",
    ("leaderboard", "validate"): "needs a submission made from a full evaluation of the release build",
}
SHARD_ARRAY = re.compile(r"\$\{?SLURM_ARRAY_TASK_ID\}?")
SHARD_REASON = "a SLURM array or its merge: test_shard_arrays_and_merge_run_on_a_stand_in runs the page's sequence"
ZOO_SEED_REASON = "a zoo build of another seed trains a new model (minutes, even with --quick)"


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/tracing.md:39"
    text: str   # the command as shown, continuation lines joined

    def argv(self, planted_model: str = PLANTED_MODEL, task: int = 0) -> list[str]:
        """The arguments after `vqa-constraints`, as a shell would pass them (env assignments dropped), as SLURM
        array task ``task``."""
        # `$(vqa-constraints zoo build flag-llava)` and the like: the planted stand-in (see the module docstring).
        text = re.sub(r"\$\(vqa-constraints zoo build [\w-]+\)", planted_model, self.text)
        text = SHARD_ARRAY.sub(str(task), text)
        words = shlex.split(text, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)
        assert words[0] == "vqa-constraints", self
        return words[1:]


def extract_commands() -> list[DocCommand]:
    commands = []
    for path in DOC_FILES:
        in_fence, pending, start = False, None, 0
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_fence, pending = not in_fence, None
                continue
            if not in_fence:
                continue
            if pending is None:
                # The README's set-up one-liner installs first, then runs the command after the last `&&`.
                match = re.match(r"^(?:.*&& )?((?:[A-Z_]+=\S+ )*vqa-constraints .*)$", stripped)
                if not match or stripped.startswith("#"):
                    continue
                pending, start, stripped = "", number, match.group(1)
            pending += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                commands.append(DocCommand(f"{path.relative_to(ROOT)}:{start}", pending.strip()))
                pending = None
    return commands


COMMANDS = extract_commands()


def subcommand(argv: list[str]) -> tuple[str, ...]:
    return tuple(argv[:2]) if argv[0] in ("zoo", "leaderboard") else (argv[0],)


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def why_not_run(argv: list[str], text: str = "") -> str | None:
    """Why the command (its arguments, and its text as shown) is only parsed here; None when it runs."""
    if argv[0] == "merge" or SHARD_ARRAY.search(text):
        return SHARD_REASON
    for key, reason in NOT_RUN.items():
        if tuple(argv[: len(key)]) == key:
            return reason
    if argv[:2] == ["zoo", "build"] and "--seed" in argv:
        return ZOO_SEED_REASON
    if "--repo-id" in argv and "--dry-run" not in argv:
        return "uploads to the Hub"
    if "--source-path" in argv:
        return "needs the paper's files"
    if any("*" in word for word in argv):
        return "a shell glob"
    return None


def runnable_commands() -> list[DocCommand]:
    """The commands to run, each distinct one once (several pages show the same build)."""
    unique: dict[tuple[str, ...], DocCommand] = {}
    for command in COMMANDS:
        if why_not_run(command.argv(), command.text) is None:
            unique.setdefault(tuple(command.argv()), command)
    return list(unique.values())


RUNNABLE = runnable_commands()


def test_extraction_finds_the_documented_commands():
    shown = {c.text for c in COMMANDS}
    assert "vqa-constraints demo --quick --out study" in shown  # the README's set-up one-liner
    assert len({c.argv()[0] for c in RUNNABLE}) >= 8, sorted({c.argv()[0] for c in RUNNABLE})


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(command, capsys):
    try:
        build_parser().parse_args(command.argv())
    except UserError as error:  # the CLI's parser reports usage errors this way
        pytest.fail(f"{command.where}: `{command.text}` does not parse: {error}")
    except SystemExit as exit_:  # plain argparse's way
        if exit_.code:
            pytest.fail(f"{command.where}: `{command.text}` does not parse: {capsys.readouterr().err.strip()}")


def runnable_argv(argv: list[str], model: Path, data: Path, workdir: Path) -> list[str]:
    """Apply the module docstring's substitutions to one command's arguments."""
    argv = list(argv)
    if "--model" in argv:
        argv[argv.index("--model") + 1] = str(model)
    if option(argv, "--data") is not None:
        argv[argv.index("--data") + 1] = str(data)
    if argv[0] in DATA_POSITIONAL and argv[1].startswith(DATA_PREFIXES):
        argv[1] = str(data)
    if option(argv, "--out") is not None and Path(option(argv, "--out")).is_absolute():
        index = argv.index("--out") + 1
        argv[index] = str(workdir / Path(argv[index]).name)
    if argv[0] == "build" and "--sources" not in argv:
        argv += ["--sources", "planted"]
    if argv[:2] == ["zoo", "build"] and argv[2] != "planted" and "--quick" not in argv:
        argv.append("--quick")
    for name, value in LIMITS.get(argv[0], {}).items():
        if name in argv:
            argv[argv.index(name) + 1] = value
        else:
            argv += [name, value]
    # Inputs the docs name relative to the repository (e.g. leaderboard/submissions) are read from it.
    for index, word in enumerate(argv):
        if index and argv[index - 1] != "--out" and not word.startswith("-") and (ROOT / word).exists():
            argv[index] = str(ROOT / word)
    return argv


@pytest.mark.parametrize("command", RUNNABLE, ids=[c.where for c in RUNNABLE])
def test_documented_command_runs(command, request, tmp_path, monkeypatch, capsys):
    # Only commands that load the model or read a build ask for them (the model is a 3-minute build on a cold cache;
    # `zoo build planted` as documented then finds it in the cache).
    argv = command.argv()
    default_planted = argv[:3] == ["zoo", "build", "planted"] and not {"--quick", "--seed"} & set(argv)
    model = request.getfixturevalue("planted_model_dir") if "--model" in argv or default_planted else None
    reads_build = "--data" in argv or argv[0] in DATA_POSITIONAL
    data = request.getfixturevalue("planted_data_dir") if reads_build else None
    if argv[:2] == ["leaderboard", "build"] and not any((ROOT / argv[2]).glob("*.json")):
        pytest.skip(f"{argv[2]} holds no submissions yet (leaderboard/seed_entries.sh makes them)")
    monkeypatch.chdir(tmp_path)
    argv = runnable_argv(command.argv(str(model)), model, data, tmp_path)
    code = run(argv)
    assert code == 0, f"{command.where}: `{command.text}` ran as {argv}: exit {code}: {capsys.readouterr().err[-2000:]}"


def shard_sequences() -> dict[str, list[DocCommand]]:
    """Per page (docs/scaling.md has its own test): its SLURM array lines and merges, in the page's order."""
    pages: dict[str, list[DocCommand]] = {}
    for command in COMMANDS:
        page = command.where.split(":")[0]
        if why_not_run(command.argv(), command.text) == SHARD_REASON and page != "docs/scaling.md":
            pages.setdefault(page, []).append(command)
    return pages


SHARD_PAGES = shard_sequences()


@pytest.mark.parametrize("page", sorted(SHARD_PAGES))
def test_shard_arrays_and_merge_run_on_a_stand_in(page, planted_model_dir, planted_data_dir, tmp_path, monkeypatch):
    """Every task of the page's array (as sbatch would run them), then its merge with the shell's glob expanded."""
    monkeypatch.chdir(tmp_path)
    merged = []
    for command in SHARD_PAGES[page]:
        if command.argv()[0] == "merge":
            argv = command.argv()
            expanded = [sorted(str(p) for p in Path().glob(word)) if "*" in word else [word] for word in argv]
            argv = [word for words in expanded for word in words]
            assert len(argv) > len(command.argv()), f"{command.where}: the glob matched no shard"
            assert run(argv) == 0, f"{command.where}: `{command.text}` ran as {argv}"
            merged.append(Path(option(argv, "--out")))
            continue
        tasks = int(re.search(r"--shard \S+/(\d+)", command.text).group(1))
        for task in range(tasks):
            argv = runnable_argv(command.argv(str(planted_model_dir), task), planted_model_dir, planted_data_dir,
                                 tmp_path)
            assert run(argv) == 0, f"{command.where}: `{command.text}` ran as {argv} (task {task})"
    assert merged and all(folder.is_dir() and any(folder.iterdir()) for folder in merged), merged


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text("utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_doc_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text("utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # external
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading '{anchor}')")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text("utf-8")
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md links no docs page named {missing}"


def test_ci_installs_and_tests_as_the_readme_says():
    readme = (ROOT / "README.md").read_text("utf-8")
    ci_lines = {line.strip() for line in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()}
    install = next(line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && "))
    steps = [step.strip() for step in install.split("&&")]
    pip_steps = [step for step in steps if step.startswith("pip install")]
    assert pip_steps and all(step in ci_lines for step in pip_steps), (pip_steps, ".ci/run")
    assert "HF_HUB_OFFLINE=1 python -m pytest -q" in readme
    assert "python -m pytest -q" in ci_lines


# --- docs/scaling.md: launcher recipes, run on the CPU with a tiny stand-in ------------------------------------------

SCALING = ROOT / "docs" / "scaling.md"
LAUNCHERS = ("vqa-constraints ", "torchrun ", "accelerate launch ")
STAND_IN_PROCESSES = 2  # for --nproc-per-node / --num_processes 8 (or 4), and for an array of 8 tasks


def scaling_blocks() -> list[str]:
    """The fenced blocks of docs/scaling.md, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", SCALING.read_text("utf-8"), flags=re.S)
    return [re.sub(r"\\\n\s*", " ", block) for block in blocks]


def scaling_stand_in(line: str, model: Path, data: Path) -> str:
    """One documented line with the stand-ins of docs/scaling.md's last section (text-level: shell words stay)."""
    line = re.sub(r"--model \S+", f"--model {model}", line)
    line = re.sub(r"--data \S+", f"--data {data}", line)
    line = re.sub(r"(--nproc-per-node|--num_processes) \d+", rf"\1 {STAND_IN_PROCESSES}", line)
    line = re.sub(r'--shard "\$SLURM_ARRAY_TASK_ID/\d+"', f'--shard "$SLURM_ARRAY_TASK_ID/{STAND_IN_PROCESSES}"', line)
    command = re.search(r"vqa-constraints (\w+)", line).group(1)
    for name, value in LIMITS.get(command, {}).items():
        line = re.sub(rf"{name} \S+", "", line) + f" {name} {value}"
    return line + (" --no-progress" if command in ("evaluate", "trace", "attention") else "")


def test_scaling_recipes_parse():
    lines = [line for block in scaling_blocks() for line in block.splitlines() if line.startswith(LAUNCHERS)]
    assert {line.split()[0] for line in lines} == {"vqa-constraints", "torchrun", "accelerate"}
    for line in lines:
        words = shlex.split(re.sub(r"\$\{?SLURM_ARRAY_TASK_ID\}?", "0", line))
        build_parser().parse_args(words[words.index("vqa-constraints") + 1:])


def test_scaling_recipes_run_on_cpu_with_a_stand_in(planted_model_dir, planted_data_dir, tmp_path):
    import os
    import subprocess
    import sys

    # As an activated venv would: the launchers and `vqa-constraints` from this interpreter's bin folder.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1")

    def bash(script: str, **extra) -> None:
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=dict(env, **extra), capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"`{script}`: exit {result.returncode}: {result.stderr[-3000:]}"

    ran = []
    for block in scaling_blocks():
        lines = [line for line in block.splitlines() if line.startswith(LAUNCHERS)]
        if block.startswith("#!/bin/bash") and "#SBATCH --array" in block:
            # A SLURM array job script: run it once per array task, as sbatch would.
            body = "\n".join(scaling_stand_in(line, planted_model_dir, planted_data_dir) for line in lines)
            for task in range(STAND_IN_PROCESSES):
                bash(body, SLURM_ARRAY_TASK_ID=str(task))
        else:
            for line in lines:
                has_model = "--model" in line
                bash(scaling_stand_in(line, planted_model_dir, planted_data_dir) if has_model else line)
        ran += lines
    assert any(line.startswith("torchrun") for line in ran) and any(line.startswith("accelerate") for line in ran)
    # Every evaluation of the page (one process, torchrun, accelerate, the merged array, 2 GPUs per rank) writes
    # the same samples, byte for byte.
    evaluations = sorted(p.parent for p in tmp_path.rglob("samples.jsonl") if ".shards" not in p.parts
                         and "shard-" not in p.parent.name)
    assert len(evaluations) == 5, evaluations
    first = (evaluations[0] / "samples.jsonl").read_bytes()
    assert first and all((e / "samples.jsonl").read_bytes() == first for e in evaluations), evaluations
    assert (tmp_path / "runs" / "llava-trace" / "trace_stats.json").exists()


# --- docs/demo.md: the llava-1.5-7b sequence, run on the CPU with the planted stand-in --------------------------------

DEMO = ROOT / "docs" / "demo.md"
GPU_MODEL = "llava-hf/llava-1.5-7b-hf"


def gpu_section() -> str:
    """docs/demo.md's "On a real checkpoint" section (up to the next heading of its level)."""
    return DEMO.read_text("utf-8").split("## On a real checkpoint", 1)[1].split("\n## ", 1)[0]


def test_gpu_sequence_runs_on_a_stand_in_with_the_same_folders(planted_model_dir, planted_data_dir, tmp_path,
                                                               monkeypatch):
    """The page's GPU sequence as written, in a fresh folder, with only the model swapped for the planted stand-in
    and small limits: every folder a command reads is one the page's build line or an earlier command wrote."""
    import shutil

    monkeypatch.chdir(tmp_path)
    section = gpu_section()
    assert "--out data/flags" in section  # the page's build line names the folder its commands read
    shutil.copytree(planted_data_dir, tmp_path / "data" / "flags")  # that build, from the planted source for speed
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        exec(compile(block, f"{DEMO}:python", "exec"), {})  # datasets.load_dataset("data/flags", ...) as shown
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.startswith("vqa-constraints ")]
    ran = []
    for line in lines:
        argv = DocCommand("docs/demo.md", line).argv()
        if tuple(argv[:2]) == ("leaderboard", "prepare"):
            continue  # NOT_RUN: it takes a full evaluation of the release build only
        if "--model" in argv:
            assert argv[argv.index("--model") + 1] == GPU_MODEL, line
        argv = [str(planted_model_dir) if word == GPU_MODEL else word for word in argv]
        for name, value in LIMITS.get(argv[0], {}).items():
            if name in argv:
                argv[argv.index(name) + 1] = value
            else:
                argv += [name, value]
        if argv[0] in ("evaluate", "trace", "attention"):
            argv.append("--no-progress")
        assert run(argv) == 0, f"docs/demo.md: `{line}` ran as {argv}"
        ran.append(argv[0])
    assert {"evaluate", "trace", "edit", "publish"} <= set(ran), ran
    for folder, document in (("runs/llava-7b", "run.json"), ("runs/llava-7b-trace", "trace_stats.json"),
                             ("runs/llava-7b-trace-text", "trace_stats.json"),
                             ("runs/llava-7b-edit", "editing_results.json")):
        assert (tmp_path / folder / document).is_file(), folder

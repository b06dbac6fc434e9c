"""Every subcommand against a generated table of bad inputs: exit 1, one `error:` line, no traceback, no new files.

The table is a cross product: each command's baseline command line (valid: ``test_baselines_succeed`` runs
the cheap ones) has slots (a build folder, a model folder, a run folder, a number, a choice, the output
path), and each slot is replaced in turn by every bad value of its kind. The CLI runs in-process
(``cli.run``): one import of torch for the whole table, a fraction of a second per case.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqa_constraints import cli

# --- the bad objects --------------------------------------------------------------------------------------

# Each kind names a corrupted copy (or a stand-in) of a valid object; the fixture ``corpus`` makes them.
DATA_KINDS = ("missing", "empty-file", "empty-dir", "garbage-file", "broken-yaml", "no-front-matter",
              "wrong-columns", "truncated-parquet", "garbage-parquet", "missing-config")
IMAGE_KINDS = ("undecodable-image",)  # only for commands that read the images (info and release do not)
MODEL_KINDS = ("missing", "empty-dir", "a-file", "garbage-safetensors", "truncated-safetensors",
               "empty-safetensors", "pickle-only", "garbage-config", "no-config", "unsupported-family")
RUN_KINDS = ("missing", "empty-dir", "a-file", "garbage-json", "unfinished")
JSON_FILE_KINDS = ("missing", "empty-file", "garbage-file", "a-dir", "json-array")

# Bad values per kind of option.
NUMBER_VALUES = {
    "positive": ("0", "-1", "abc", "2.5"),
    "non-negative": ("-5", "abc"),
    "finite": ("nan", "inf", "-inf", "abc"),
    "integer": ("abc", "1e3"),
    "layer": ("99", "-1"),  # the tiny LLaVA has 3 layers
    "beyond-model": ("99",),  # more layers / image tokens than the tiny model has
}
CHOICE_VALUES = ("bogus", "")


@dataclass(frozen=True)
class Command:
    """A valid baseline command line; each slot names the placeholder in ``argv`` that a case replaces."""

    argv: tuple[str, ...]
    data: str | None = None  # the placeholder of a build folder: "{data}" (planted) or "{real_data}" (flags)
    decodes_images: bool = False
    model: bool = False  # "{model}"
    run: str | None = None  # the placeholder of a finished run folder: "{run}" (a full run) or "{shard_run}"
    json_file: str | None = None  # placeholder of a JSON file input
    out: str | None = "{out}"  # "{out}" a folder, "{out_file}" a file
    numbers: tuple[tuple[str, str], ...] = ()  # (flag, kind of NUMBER_VALUES)
    choices: tuple[str, ...] = ()
    combos: tuple[tuple[str, ...], ...] = ()  # bad combinations of otherwise valid values
    optional: tuple[str, ...] = ()  # flags of the baseline that may be left out
    baseline_ok: bool = True  # the baseline succeeds in seconds (test_baselines_succeed runs it)


MODEL_ARGS = ("--model", "{model}", "--device", "cpu", "--dtype", "float32")
COMMANDS = {
    "build": Command(("build", "--out", "{out}", "--sources", "planted"),
                     numbers=(("--seed", "integer"),), choices=("--sources", "--source-path"),
                     combos=(("--source-path", "okvqa"), ("--source-path", "okvqa={missing}"),
                             ("--source-path", "planted.bogus={missing}"))),
    "validate": Command(("validate", "{data}"), data="{data}", decodes_images=True, out=None),
    "publish": Command(("publish", "{data}", "--repo-id", "org/name", "--dry-run"), data="{data}", decodes_images=True,
                       out=None,
                       combos=(("--repo-id", "no-slash"), ("--repo-id", "a/b/c"), ("--repo-id", "/name"))),
    "info": Command(("info", "{data}"), data="{data}", out=None),
    "evaluate": Command(("evaluate", *MODEL_ARGS, "--data", "{data}", "--out", "{out}", "--config",
                         "single_constraint", "--limit", "2", "--no-progress", "--scoring", "generate"),
                        data="{data}", decodes_images=True, model=True,
                        numbers=(("--limit", "positive"), ("--batch-size", "positive"),
                                 ("--max-new-tokens", "positive"), ("--seed", "integer")),
                        choices=("--config", "--scoring", "--backend", "--split", "--shard", "--device", "--dtype"),
                        combos=(("--backend", "vllm"), ("--shard", "2/2"), ("--shard", "-1/2"), ("--shard", "0/0")),
                        optional=("--config",)),
    "merge": Command(("merge", "{shard_run0}", "{shard_run}", "--out", "{out}"), run="{shard_run}"),
    "trace": Command(("trace", *MODEL_ARGS, "--data", "{data}", "--config", "single_constraint", "--out", "{out}",
                      "--limit", "2", "--no-progress"),
                     data="{data}", decodes_images=True, model=True,
                     numbers=(("--limit", "positive"), ("--max-batch", "positive"), ("--window", "positive"),
                              ("--window", "beyond-model"), ("--noise-samples", "positive"),
                              ("--threshold", "finite"), ("--seed", "integer")),
                     choices=("--config", "--corruption", "--kinds", "--positions", "--answer", "--engine", "--split"),
                     combos=(("--replace-token", ""), ("--text-only", "--corruption", "image-noise"))),
    "attention": Command(("attention", *MODEL_ARGS, "--data", "{data}", "--config", "single_constraint",
                          "--out", "{out}", "--limit", "2", "--draws", "1", "--no-progress"),
                         data="{data}", decodes_images=True, model=True,
                         numbers=(("--limit", "positive"), ("--top-k", "positive"), ("--top-k", "beyond-model"),
                                  ("--draws", "positive"), ("--layers-for-auroc", "positive"),
                                  ("--layers-for-auroc", "beyond-model"), ("--seed", "integer")),
                         choices=("--config", "--split", "--knockout-layers"),
                         combos=(("--knockout-layers", "0-99"), ("--knockout-layers", "5-2"))),
    "edit": Command(("edit", *MODEL_ARGS, "--data", "{data}", "--out", "{out}", "--layers", "1", "--limit", "1",
                     "--specificity-size", "2", "--method", "multedit"),
                    data="{data}", decodes_images=True, model=True,
                    numbers=(("--limit", "positive"), ("--specificity-size", "positive"),
                             ("--preserve", "non-negative"), ("--batch-edits", "positive"),
                             ("--trace-limit", "positive"), ("--layers", "layer"), ("--sweep-layers", "layer"),
                             ("--seed", "integer")),
                    choices=("--method", "--track", "--key-position", "--split", "--layers"),
                    combos=(("--save", "{model}"), ("--save", "{a_file}"))),
    "leaderboard-validate": Command(("leaderboard", "validate", "{submission}", "--release", "{release}"),
                                    json_file="{submission}", out=None),
    "leaderboard-validate-release": Command(("leaderboard", "validate", "{submission}", "--release", "{release}"),
                                            json_file="{release}", out=None),
    # The baseline fails on purpose (--data is checked against the test split; the small run scored validation).
    "leaderboard-validate-data": Command(("leaderboard", "validate", "{submission}", "--data", "{real_data}"),
                                         data="{real_data}", out=None, baseline_ok=False),
    "leaderboard-build": Command(("leaderboard", "build", "{submissions}", "--out", "{out}", "--release", "{release}"),
                                 json_file="{submissions}"),
    "leaderboard-prepare": Command(("leaderboard", "prepare", "{run}", "--model-name", "tiny", "--submitted-by", "t",
                                    "--out", "{out}"), run="{run}", combos=(("{limit_run}",),)),
    "leaderboard-release": Command(("leaderboard", "release", "--data", "{real_data}", "--split", "validation",
                                    "--out", "{out_file}"), data="{real_data}", out="{out_file}", choices=("--split",)),
    # The baselines would build a model or run the whole study: minutes, so not run here.
    "zoo": Command(("zoo", "build", "planted", "--quick"), out=None, numbers=(("--seed", "integer"),),
                   combos=(("--out", "{a_file}"), ("--out", "{under_a_file}")), baseline_ok=False),
    "demo": Command(("demo", "--out", "{out}", "--quick"), numbers=(("--seed", "integer"),), baseline_ok=False),
}
OUT_KINDS = {"{out}": ("a-file", "under-a-file"), "{out_file}": ("a-dir", "under-a-file")}


@dataclass(frozen=True)
class Case:
    command: str
    slot: str  # a placeholder ("{data}"), a flag ("--limit"), "combo" or "argparse"
    kind: str  # the bad-value kind, or the bad value itself
    extra: tuple[str, ...] = ()  # a combo's arguments

    @property
    def id(self) -> str:
        return f"{self.command} {self.slot}={self.kind or repr(self.kind)}"


def generate_cases() -> list[Case]:
    cases = []
    for name, c in COMMANDS.items():
        if c.data:
            cases += [Case(name, c.data, k) for k in DATA_KINDS + (IMAGE_KINDS if c.decodes_images else ())]
        if c.model:
            cases += [Case(name, "{model}", k) for k in MODEL_KINDS]
        if c.run:
            cases += [Case(name, c.run, k) for k in RUN_KINDS]
        if c.json_file:
            cases += [Case(name, c.json_file, k) for k in JSON_FILE_KINDS]
        if c.out:
            cases += [Case(name, c.out, k) for k in OUT_KINDS[c.out]]
        cases += [Case(name, flag, value) for flag, kind in c.numbers for value in NUMBER_VALUES[kind]]
        cases += [Case(name, flag, value) for flag in c.choices for value in CHOICE_VALUES]
        cases += [Case(name, "combo", " ".join(combo), combo) for combo in c.combos]
        # argparse's own errors: an unknown flag, and each required flag left out (validate's --data is optional:
        # without it the shipped release is used).
        cases.append(Case(name, "argparse", "--bogus-flag"))
        cases += [Case(name, "argparse", f"without {flag}")
                  for flag in ("--model", "--data", "--out", "--config", "--repo-id", "--model-name")
                  if flag in c.argv and flag not in c.optional and name != "leaderboard-validate-data"]
    cases += [Case("zoo", "argparse", "no subcommand"), Case("leaderboard", "argparse", "no subcommand"),
              Case("zoo", "argparse", "name bogus"), Case("no-such-command", "argparse", "unknown command"),
              Case("", "argparse", "no command")]
    return cases


CASES = generate_cases()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, planted_data_dir, tiny_model_dirs):
    """Valid baseline objects ("valid": placeholder -> path) and the broken ones ("kinds": placeholder -> kind -> path)."""
    root = tmp_path_factory.mktemp("bad-input")
    model, data = Path(tiny_model_dirs("llava")), Path(planted_data_dir)
    a_file = root / "a-file.txt"
    a_file.write_text("not what was asked for\n")
    garbage = root / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 8)
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "a-dir").mkdir()
    common = {"missing": root / "missing", "empty-file": root / "empty-file", "empty-dir": root / "empty-dir",
              "garbage-file": garbage, "a-file": a_file, "a-dir": root / "a-dir", "under-a-file": a_file / "sub"}

    builds = {k: common[k] for k in ("missing", "empty-file", "empty-dir", "garbage-file")}
    for kind in DATA_KINDS[4:] + IMAGE_KINDS:
        build = builds[kind] = root / f"data-{kind}"
        shutil.copytree(data, build)
        shards = sorted(build.glob("*/*.parquet"))
        if kind == "broken-yaml":
            card = build / "README.md"
            card.write_text(card.read_text().replace("configs:", "configs: [unclosed", 1))
        elif kind == "no-front-matter":
            (build / "README.md").write_text("# a card without YAML\n")
        elif kind == "missing-config":
            shutil.rmtree(build / "single_constraint")
        for shard in shards if kind in ("wrong-columns", "truncated-parquet", "garbage-parquet",
                                        "undecodable-image") else ():
            if kind == "wrong-columns":
                pq.write_table(pa.table({"foo": [1, 2], "bar": ["x", "y"]}), shard)
            elif kind == "truncated-parquet":
                shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            elif kind == "garbage-parquet":
                shard.write_bytes(garbage.read_bytes())
            else:  # every image's bytes replaced by bytes no image library decodes
                table = pq.read_table(shard)
                column = table.schema.get_field_index("image")
                broken = pa.array([{"bytes": b"\x89PNG not really", "path": image["path"]}
                                   for image in table.column("image").to_pylist()],
                                  type=table.schema.field("image").type)
                pq.write_table(table.set_column(column, "image", broken), shard)

    models = {k: common[k] for k in ("missing", "empty-dir", "a-file")}
    for kind in MODEL_KINDS[3:]:
        folder = models[kind] = root / f"model-{kind}"
        shutil.copytree(model, folder)
        weights = folder / "model.safetensors"
        if kind == "garbage-safetensors":
            weights.write_bytes(garbage.read_bytes())
        elif kind == "truncated-safetensors":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif kind == "empty-safetensors":
            weights.write_bytes(b"")
        elif kind == "pickle-only":
            weights.rename(folder / "pytorch_model.bin")
        elif kind == "garbage-config":
            (folder / "config.json").write_text("{ not json")
        elif kind == "no-config":
            (folder / "config.json").unlink()
        else:  # unsupported-family
            (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))

    # The leaderboard takes real-world builds only: a flags build, a finished full run of its (small) validation
    # split and a --limit run, for merge and leaderboard.
    real_data = root / "flags"
    assert cli.run(["build", "--out", str(real_data), "--sources", "flags"]) == 0
    runs = root / "runs"
    base = ["evaluate", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--data", str(real_data),
            "--split", "validation", "--scoring", "generate", "--max-new-tokens", "2", "--no-progress"]
    assert cli.run([*base, "--out", str(runs / "full")]) == 0
    assert cli.run([*base, "--out", str(runs / "limited"), "--limit", "2"]) == 0
    for i in range(2):  # for merge: the two shards of a small evaluation
        assert cli.run(["evaluate", *base[1:7], "--data", str(data), "--config", "single_constraint", "--limit", "2",
                        "--scoring", "generate", "--max-new-tokens", "2", "--no-progress", "--shard", f"{i}/2",
                        "--out", str(runs / f"shard{i}")]) == 0
    run_kinds = {k: common[k] for k in ("missing", "empty-dir", "a-file")}
    run_kinds["garbage-json"] = shutil.copytree(runs / "full", root / "run-garbage-json")
    for name in ("run.json", "results.json"):  # merge reads the one, prepare the other
        (run_kinds["garbage-json"] / name).write_text("{ not json")
    run_kinds["unfinished"] = shutil.copytree(runs / "full", root / "run-unfinished")
    (run_kinds["unfinished"] / "results.json").unlink()

    submissions = root / "submissions"
    assert cli.run(["leaderboard", "prepare", str(runs / "full"), "--model-name", "tiny", "--submitted-by", "t",
                    "--out", str(submissions)]) == 0
    release = root / "release.json"
    assert cli.run(["leaderboard", "release", "--data", str(real_data), "--split", "validation",
                    "--out", str(release)]) == 0
    json_files = {k: common[k] for k in ("missing", "empty-file", "garbage-file", "a-dir")}
    json_files["json-array"] = root / "array.json"
    json_files["json-array"].write_text("[1, 2]")
    # For `leaderboard build`: a folder holding one unreadable entry per kind (a file or nothing for the rest).
    submission_dirs = {"missing": common["missing"], "a-dir": common["empty-dir"]}
    for kind in ("empty-file", "garbage-file", "json-array"):
        folder = submission_dirs[kind] = root / f"submissions-{kind}"
        folder.mkdir()
        shutil.copyfile(json_files[kind], folder / "entry.json")

    valid = {"{model}": model, "{data}": data, "{real_data}": real_data, "{run}": runs / "full", "{limit_run}": runs / "limited",
             "{shard_run0}": runs / "shard0", "{shard_run}": runs / "shard1",
             "{submission}": submissions / "tiny.json", "{submissions}": submissions, "{release}": release,
             "{missing}": common["missing"], "{a_file}": a_file, "{under_a_file}": common["under-a-file"],
             "{garbage}": garbage}
    out_kinds = {k: common[k] for k in ("a-file", "a-dir", "under-a-file")}
    kinds = {"{data}": builds, "{real_data}": builds, "{model}": models, "{run}": run_kinds, "{shard_run}": run_kinds,
             "{submission}": json_files,
             "{release}": json_files, "{submissions}": submission_dirs, "{out}": out_kinds, "{out_file}": out_kinds}
    return {"root": root, "valid": valid, "kinds": kinds}


def argv_for(case: Case, corpus: dict, out: Path) -> list[str]:
    """The baseline command line of ``case.command`` with the one bad value of ``case`` put in."""
    if case.kind in ("no subcommand", "unknown command"):
        return [case.command]
    if case.kind == "no command":
        return []
    values = {"{out}": out, "{out_file}": out / "release.json", **corpus["valid"]}
    argv = list(COMMANDS[case.command].argv)
    if case.slot in corpus["kinds"]:  # a path slot: the broken object of this kind
        values[case.slot] = corpus["kinds"][case.slot][case.kind]
    elif case.slot == "argparse":
        if case.kind == "--bogus-flag":
            argv.append(case.kind)
        elif case.kind == "name bogus":
            argv[2] = "bogus"
        else:  # "without --flag"
            at = argv.index(case.kind.split()[-1])
            del argv[at : at + 2]
    elif case.slot == "combo":
        extra = list(case.extra)
        if extra[0].startswith("{"):  # another positional object
            argv, extra = [extra[0] if a == "{run}" else a for a in argv], []
        while extra:  # "--flag value" pairs, or a lone "--flag"
            if len(extra) > 1 and not extra[1].startswith("--"):
                argv, extra = _with_option(argv, extra[0], extra[1]), extra[2:]
            else:
                argv, extra = [*argv, extra[0]], extra[1:]
    else:  # a number or a choice
        argv = _with_option(argv, case.slot, case.kind)
    return [str(values.get(a, a)) for a in argv]


def _with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """Set ``flag``'s value (appended when the baseline lacks the flag)."""
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``roots`` with its size and modification time."""
    files = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            stat = path.lstat()
            files[str(path)] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (0, 0)
    return files


def run_cli(argv: list[str], capsys) -> tuple[object, str]:
    capsys.readouterr()
    try:
        code = cli.run(argv)
    except SystemExit as exit_:  # the contract is a return code: a SystemExit escaping is a failure too
        code = f"SystemExit({exit_.code})"
    return code, capsys.readouterr().err


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 145
    assert len({case.id for case in CASES}) == len(CASES)
    covered = {case.command.split("-")[0] for case in CASES}
    assert covered >= {"build", "validate", "publish", "info", "zoo", "evaluate", "merge", "leaderboard", "trace",
                       "attention", "edit", "demo"}


def _mentions(case: Case, corpus: dict) -> tuple[str, ...]:
    """What the error line must name (any one of): the bad file or folder, or the flag or value that is bad."""
    if case.slot in corpus["kinds"]:
        return (Path(corpus["kinds"][case.slot][case.kind]).name,)
    if case.slot.startswith("--"):
        return case.slot, repr(case.kind)
    return ()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_clean_line(case, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path a command might write lands where the snapshot sees it
    argv = argv_for(case, corpus, tmp_path / "out")
    roots = (corpus["root"], corpus["valid"]["{model}"], corpus["valid"]["{data}"], tmp_path)
    before = snapshot(*roots)
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert code == 1, f"{argv}: exit {code}\n{err}"
    assert len(lines) == 1, f"{argv}\n{err}"
    assert "internal error" not in lines[0]
    mentions = _mentions(case, corpus)
    assert not mentions or any(m in lines[0] for m in mentions), f"{lines[0]!r} names none of {mentions}"
    assert snapshot(*roots) == before, f"{argv} left files behind"


@pytest.mark.parametrize("name", [name for name, command in COMMANDS.items() if command.baseline_ok])
def test_baselines_succeed(name, corpus, tmp_path, capsys, monkeypatch):
    """Each bad case differs from a command line that works, so it fails for the reason it names."""
    monkeypatch.chdir(tmp_path)
    values = {"{out}": tmp_path / "out", "{out_file}": tmp_path / "release.json", **corpus["valid"]}
    argv = [str(values.get(a, a)) for a in COMMANDS[name].argv]
    code, err = run_cli(argv, capsys)
    assert code == 0, f"{argv}\n{err}"


def test_a_bug_is_one_line_with_where_to_report_it_and_debug_shows_the_traceback(capsys):
    def broken(args):
        return 1 / 0

    code = cli.dispatch(broken, argparse.Namespace(), debug=False)
    err = capsys.readouterr().err
    assert code == cli.EXIT_BUG and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "internal error" in line and "ZeroDivisionError: division by zero" in line and "--debug" in line
    assert cli.dispatch(broken, argparse.Namespace(), debug=True) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error")


def test_help_and_version_exit_0(capsys):
    assert run_cli(["--version"], capsys)[0] == 0
    assert run_cli(["evaluate", "--help"], capsys)[0] == 0


# --- the later surfaces: merge, --shard, --device-map, edit --save/--out, prepare --from-lmms-eval, validate --rerun --
#
# Each case forges or breaks one object made by a real run (shards of trace, attention and evaluate on 4 planted
# questions; lmms-eval logs of the flags validation split) and must end like the table above: exit 1, one line
# naming the file or flag, no traceback, nothing written or changed.

HUGE_SHARD = "0/100000000000000000000"  # more shards than questions: every slice is empty


def _flags_rows(real_data: Path) -> dict[str, list[dict]]:
    from vqa_constraints.loading import load_split

    return {config: load_split(str(real_data), config, "validation").rows.select_columns(["id", "answers"]).to_list()
            for config in ("single_constraint", "multi_constraint", "encyclopedic")}


def _log_lines(rows: list[dict]) -> str:
    """lmms-eval 0.7 --log_samples lines of the vqa_constraints tasks, answering with the first gold answer."""
    return "".join(json.dumps({"accuracy_visual": {"id": r["id"]}, "filtered_resps": [r["answers"][0]],
                               "target": r["answers"][0]}) + "\n" for r in rows)


@pytest.fixture(scope="module")
def surfaces(corpus):
    root = corpus["root"] / "surfaces"
    model, data = corpus["valid"]["{model}"], corpus["valid"]["{data}"]
    common = ["--model", str(model), "--data", str(data), "--config", "single_constraint", "--limit", "4",
              "--no-progress", "--device", "cpu", "--dtype", "float32"]
    made = {}
    for shard in ("0/2", "1/2", None, HUGE_SHARD):
        name = {"0/2": "0", "1/2": "1", None: "all", HUGE_SHARD: "huge"}[shard]
        extra = ["--shard", shard] if shard else []
        for command, args in (("trace", ["--kinds", "mlp", "--traced", "all"]), ("attention", ["--draws", "1"]),
                              ("evaluate", ["--scoring", "generate", "--max-new-tokens", "2"])):
            if (command == "attention" and shard in (None, HUGE_SHARD)) or (command == "evaluate" and shard == HUGE_SHARD):
                continue
            out = made[f"{command}-{name}"] = root / f"{command}-{name}"
            assert cli.run([command, *common, *args, *extra, "--out", str(out)]) == 0, (command, shard)
    logs = root / "lmms-logs"
    logs.mkdir()
    for config, rows in _flags_rows(corpus["valid"]["{real_data}"]).items():
        (logs / f"model_samples_vqa_constraints_{config}.jsonl").write_text(_log_lines(rows))
    made["logs"] = logs
    return made


def _copy(src: Path, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(src, tmp / name) if Path(src).is_dir() else shutil.copy(src, tmp / name))


def _swap(a: Path, b: Path, name: str) -> None:
    data_a = (a / name).read_bytes()
    (a / name).write_bytes((b / name).read_bytes())
    (b / name).write_bytes(data_a)


def _merge(*folders, out) -> list[str]:
    return ["merge", *map(str, folders), "--out", str(out)]


def merge_trace_rows_copied(c, s, tmp):
    one = _copy(s["trace-1"], tmp, "trace-1")
    shutil.copy(s["trace-0"] / "traces.parquet", one / "traces.parquet")
    return _merge(s["trace-0"], one, out=tmp / "out"), ("trace-1",)


def merge_trace_rows_half_dropped(c, s, tmp):
    one = _copy(s["trace-1"], tmp, "trace-1")
    table = pq.read_table(one / "traces.parquet")
    pq.write_table(table.slice(0, table.num_rows // 2), one / "traces.parquet")
    return _merge(s["trace-0"], one, out=tmp / "out"), ("trace-1",)


def merge_trace_rows_swapped(c, s, tmp):
    zero, one = _copy(s["trace-0"], tmp, "trace-0"), _copy(s["trace-1"], tmp, "trace-1")
    _swap(zero, one, "traces.parquet")
    return _merge(zero, one, out=tmp / "out"), ("trace-0", "trace-1")


def merge_attention_rows_copied(c, s, tmp):
    one = _copy(s["attention-1"], tmp, "attention-1")
    shutil.copy(s["attention-0"] / "attention_examples.parquet", one / "attention_examples.parquet")
    return _merge(s["attention-0"], one, out=tmp / "out"), ("attention-1",)


def merge_attention_rows_swapped(c, s, tmp):
    zero, one = _copy(s["attention-0"], tmp, "attention-0"), _copy(s["attention-1"], tmp, "attention-1")
    _swap(zero, one, "attention_examples.parquet")
    return _merge(zero, one, out=tmp / "out"), ("attention-0", "attention-1")


def merge_evaluate_samples_swapped(c, s, tmp):
    zero, one = _copy(s["evaluate-0"], tmp, "evaluate-0"), _copy(s["evaluate-1"], tmp, "evaluate-1")
    _swap(zero, one, "samples.jsonl")
    return _merge(zero, one, out=tmp / "out"), ("evaluate-0", "evaluate-1")


def merge_evaluate_samples_copied(c, s, tmp):
    one = _copy(s["evaluate-1"], tmp, "evaluate-1")
    shutil.copy(s["evaluate-0"] / "samples.jsonl", one / "samples.jsonl")
    return _merge(s["evaluate-0"], one, out=tmp / "out"), ("evaluate-1", "evaluate-0")


def merge_single_unsharded_trace(c, s, tmp):
    return _merge(s["trace-all"], out=tmp / "out"), ("trace-all",)


def merge_single_unsharded_evaluate(c, s, tmp):
    return _merge(s["evaluate-all"], out=tmp / "out"), ("evaluate-all",)


def merge_traces_parquet_not_parquet(c, s, tmp):
    one = _copy(s["trace-1"], tmp, "trace-1")
    (one / "traces.parquet").write_text("id,p\nq,0.5\n")
    return _merge(s["trace-0"], one, out=tmp / "out"), ("traces.parquet",)


def merge_trace_stats_empty_list(c, s, tmp):
    one = _copy(s["trace-1"], tmp, "trace-1")
    (one / "trace_stats.json").write_text("[]")
    return _merge(s["trace-0"], one, out=tmp / "out"), ("trace_stats.json",)


def merge_trace_stats_empty_object(c, s, tmp):
    one = _copy(s["trace-1"], tmp, "trace-1")
    (one / "trace_stats.json").write_text("{}")
    return _merge(s["trace-0"], one, out=tmp / "out"), ("trace_stats.json",)


def merge_run_json_without_identity(c, s, tmp):
    one = _copy(s["evaluate-1"], tmp, "evaluate-1")
    (one / "run.json").write_text(json.dumps({"format": 1}))
    return _merge(s["evaluate-0"], one, out=tmp / "out"), ("run.json",)


def merge_output_of_a_huge_shard_count(c, s, tmp):
    return _merge(s["trace-huge"], out=tmp / "out"), ("100000000000000000000",)


def merge_out_inside_an_input(c, s, tmp):
    zero, one = _copy(s["trace-0"], tmp, "trace-0"), _copy(s["trace-1"], tmp, "trace-1")
    return _merge(zero, one, out=zero / "merged"), ("--out",)


def _submission(c, tmp) -> tuple[Path, dict, Path]:
    folder = _copy(c["valid"]["{submissions}"], tmp, "subs")
    path = folder / "tiny.json"
    document = json.loads(path.read_text())
    return path, document, folder / document["submission"]["samples"]


def _validate(path, c, *extra) -> list[str]:
    return ["leaderboard", "validate", str(path), "--release", str(c["valid"]["{release}"]), *extra]


def validate_samples_not_utf8(c, s, tmp):
    path, _, samples = _submission(c, tmp)
    samples.write_bytes(samples.read_bytes().replace(b'"', b'\xff', 1))
    return _validate(path, c), ("tiny.json",)


def validate_nul_in_samples_name(c, s, tmp):
    path, document, _ = _submission(c, tmp)
    document["submission"]["samples"] = "tiny\u0000.samples.jsonl"
    path.write_text(json.dumps(document))
    return _validate(path, c), ("tiny.json",)


def validate_deeply_nested_json(c, s, tmp):
    path, _, _ = _submission(c, tmp)
    path.write_text("[" * 100_000 + "]" * 100_000)
    return _validate(path, c), ("tiny.json",)


def validate_deeply_nested_samples_line(c, s, tmp):
    path, _, samples = _submission(c, tmp)
    samples.write_text(samples.read_text() + "[" * 100_000 + "]" * 100_000 + "\n")
    return _validate(path, c), ("tiny.json",)


def validate_rerun_data_without_the_released_questions(c, s, tmp):
    path, _, _ = _submission(c, tmp)
    return _validate(path, c, "--rerun", "1000", "--rerun-data", str(c["valid"]["{data}"]),
                     "--device", "cpu"), ("--rerun-data",)


def validate_rerun_seed_without_rerun(c, s, tmp):
    return _validate(c["valid"]["{submission}"], c, "--rerun-seed", "7"), ("--rerun-seed",)


def validate_rerun_seed_negative(c, s, tmp):
    return _validate(c["valid"]["{submission}"], c, "--rerun", "1", "--rerun-data", str(c["valid"]["{real_data}"]),
                     "--rerun-seed", "-1"), ("--rerun-seed",)


def _prepare(logs, c, tmp, model=None) -> list[str]:
    return ["leaderboard", "prepare", "--from-lmms-eval", *map(str, logs), "--data", str(c["valid"]["{real_data}"]),
            "--split", "validation", "--model", str(model or c["valid"]["{model}"]), "--model-name", "m",
            "--submitted-by", "t", "--out", str(tmp / "out")]


def _log_copy(s, tmp) -> Path:
    return _copy(s["logs"], tmp, "logs")


def prepare_binary_log(c, s, tmp):
    logs = _log_copy(s, tmp)
    (logs / "model_samples_vqa_constraints_encyclopedic.jsonl").write_bytes(bytes(range(256)) * 4)
    return _prepare([logs], c, tmp), ("encyclopedic.jsonl",)


def prepare_invalid_utf8_log(c, s, tmp):
    logs = _log_copy(s, tmp)
    log = logs / "model_samples_vqa_constraints_encyclopedic.jsonl"
    log.write_bytes(log.read_bytes().replace(b"{", b"{\"x\": \"\xc3\x28\", ", 1))
    return _prepare([logs], c, tmp), ("encyclopedic.jsonl",)


def prepare_deeply_nested_line(c, s, tmp):
    logs = _log_copy(s, tmp)
    log = logs / "model_samples_vqa_constraints_encyclopedic.jsonl"
    log.write_text("[" * 100_000 + "]" * 100_000 + "\n" + log.read_text())
    return _prepare([logs], c, tmp), ("encyclopedic.jsonl",)


def prepare_folder_named_like_a_log(c, s, tmp):
    logs = tmp / "logs"
    (logs / "run" / "model_samples_vqa_constraints_single_constraint.jsonl").mkdir(parents=True)
    return _prepare([logs], c, tmp), ("logs",)


def prepare_logs_of_one_config(c, s, tmp):
    return _prepare([s["logs"] / "model_samples_vqa_constraints_single_constraint.jsonl"], c, tmp), (
        "multi_constraint", "encyclopedic")


def prepare_model_that_does_not_exist(c, s, tmp):
    return _prepare([s["logs"]], c, tmp, model=tmp / "no-such-model"), ("no-such-model",)


def _build_with(c, tmp, change) -> tuple[list[str], tuple[str, ...]]:
    path, document, _ = _submission(c, tmp)
    named = change(path, document) or path.name
    return ["leaderboard", "build", str(path.parent), "--out", str(tmp / "board"), "--release",
            str(c["valid"]["{release}"])], (named,)


def _renamed(name):
    def change(path, document):
        document["submission"]["model_name"] = name
        path.write_text(json.dumps(document))
    return change


def build_cyrillic_look_alike(c, s, tmp):
    def change(path, document):
        twin = json.loads(json.dumps(document))
        twin["submission"]["model_name"] = "tiny"[:1] + "\u0456" + "ny"  # Cyrillic i
        (path.parent / "twin.json").write_text(json.dumps(twin))
        return "twin.json"
    return _build_with(c, tmp, change)


def build_case_look_alike(c, s, tmp):
    def change(path, document):
        twin = json.loads(json.dumps(document))
        twin["submission"]["model_name"] = " TINY"[1:]
        (path.parent / "twin.json").write_text(json.dumps(twin))
        return "twin.json"
    return _build_with(c, tmp, change)


def build_whitespace_only_name(c, s, tmp):
    return _build_with(c, tmp, _renamed(" \t  "))


def build_huge_name(c, s, tmp):
    return _build_with(c, tmp, _renamed("x" * 5_000_000))


def build_submission_symlink_outside(c, s, tmp):
    def change(path, document):
        outside = tmp / "outside"
        outside.mkdir()
        shutil.move(str(path), outside / path.name)
        shutil.move(str(path.parent / document["submission"]["samples"]), outside / document["submission"]["samples"])
        path.symlink_to(outside / path.name)
    return _build_with(c, tmp, change)


def _broken_build(c, tmp, field, value) -> Path:
    build = _copy(c["valid"]["{data}"], tmp, "data")
    [shard] = sorted((build / "single_constraint").glob("test*.parquet"))[:1]
    table = pq.read_table(shard)
    column = table.column(field).to_pylist()
    column[0] = value
    pq.write_table(table.set_column(table.schema.get_field_index(field), field,
                                    pa.array(column, type=table.schema.field(field).type)), shard)
    return build


def _evaluate(c, tmp, data=None, out=None, *extra) -> list[str]:
    return ["evaluate", *MODEL_ARGS, "--data", str(data or c["valid"]["{data}"]), "--config", "single_constraint",
            "--limit", "2", "--no-progress", "--scoring", "generate", "--out", str(out or tmp / "out"), *extra]


def evaluate_build_with_empty_answers(c, s, tmp):
    return [str(c["valid"].get(a, a)) for a in _evaluate(c, tmp, _broken_build(c, tmp, "answers", []))], ("answers",)


def evaluate_build_with_empty_question(c, s, tmp):
    return [str(c["valid"].get(a, a)) for a in _evaluate(c, tmp, _broken_build(c, tmp, "question", ""))], ("question",)


def evaluate_out_inside_the_model(c, s, tmp):
    model = _copy(c["valid"]["{model}"], tmp, "model")
    argv = _evaluate(c, tmp, None, model / "run")
    return [str(model) if a == "{model}" else a for a in argv], ("--out",)


def evaluate_out_another_tools_folder(c, s, tmp):
    other = _copy(s["trace-0"], tmp, "trace-0")
    return [str(c["valid"].get(a, a)) for a in _evaluate(c, tmp, None, other)], ("--out",)


def evaluate_device_cuda_device_map_auto_without_cuda(c, s, tmp):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [str(c["valid"].get(a, a)) for a in _evaluate(c, tmp, None, None, "--device-map", "auto")]
    argv[argv.index("--device") + 1] = "cuda"
    return argv, ("--device",)


def _tool(command, c, tmp, out, *extra) -> list[str]:
    argv = [*COMMANDS[command].argv, *extra]
    values = {**c["valid"], "{out}": out}
    return [str(values.get(a, a)) for a in _with_option(argv, "--out", str(out))]


def trace_out_inside_the_model(c, s, tmp):
    model = _copy(c["valid"]["{model}"], tmp, "model")
    argv = _tool("trace", c, tmp, model / "trace")
    return _with_option(argv, "--model", str(model)), ("--out",)


def trace_out_an_evaluate_run(c, s, tmp):
    return _tool("trace", c, tmp, _copy(s["evaluate-0"], tmp, "run")), ("--out",)


def attention_out_inside_the_model(c, s, tmp):
    model = _copy(c["valid"]["{model}"], tmp, "model")
    return _with_option(_tool("attention", c, tmp, model / "attention"), "--model", str(model)), ("--out",)


def edit_out_inside_the_model(c, s, tmp):
    model = _copy(c["valid"]["{model}"], tmp, "model")
    return _with_option(_tool("edit", c, tmp, model / "edit"), "--model", str(model)), ("--out",)


def edit_out_and_save_the_same_folder(c, s, tmp):
    return _tool("edit", c, tmp, tmp / "same", "--save", str(tmp / "same")), ("--out", "--save")


def edit_out_and_save_the_same_folder_overwrite(c, s, tmp):
    (tmp / "same").mkdir()
    (tmp / "same" / "editing_results.json").write_text("{}")
    return _tool("edit", c, tmp, tmp / "same", "--save", str(tmp / "same"), "--overwrite"), ("--out", "--save")


def edit_save_into_the_zoo_cache_overwrite(c, s, tmp):
    # A private cache (the test sets VQA_CONSTRAINTS_CACHE to it): code with the bug replaces only this one.
    cache = tmp / "cache"
    (cache / "zoo" / "planted-0123").mkdir(parents=True)
    (cache / "zoo" / "planted-0123" / "config.json").write_text("{}")
    return _tool("edit", c, tmp, tmp / "out", "--save", str(cache), "--overwrite"), ("--save",)


SURFACE_CASES = {f.__name__: f for f in [
    merge_trace_rows_copied, merge_trace_rows_half_dropped, merge_trace_rows_swapped, merge_attention_rows_copied,
    merge_attention_rows_swapped, merge_evaluate_samples_swapped, merge_evaluate_samples_copied,
    merge_single_unsharded_trace, merge_single_unsharded_evaluate, merge_traces_parquet_not_parquet,
    merge_trace_stats_empty_list, merge_trace_stats_empty_object, merge_run_json_without_identity,
    merge_output_of_a_huge_shard_count, merge_out_inside_an_input,
    validate_samples_not_utf8, validate_nul_in_samples_name, validate_deeply_nested_json,
    validate_deeply_nested_samples_line, validate_rerun_data_without_the_released_questions,
    validate_rerun_seed_without_rerun, validate_rerun_seed_negative,
    prepare_binary_log, prepare_invalid_utf8_log, prepare_deeply_nested_line, prepare_folder_named_like_a_log,
    prepare_logs_of_one_config, prepare_model_that_does_not_exist,
    build_cyrillic_look_alike, build_case_look_alike, build_whitespace_only_name, build_huge_name,
    build_submission_symlink_outside,
    evaluate_build_with_empty_answers, evaluate_build_with_empty_question, evaluate_out_inside_the_model,
    evaluate_out_another_tools_folder, evaluate_device_cuda_device_map_auto_without_cuda,
    trace_out_inside_the_model, trace_out_an_evaluate_run, attention_out_inside_the_model,
    edit_out_inside_the_model, edit_out_and_save_the_same_folder, edit_out_and_save_the_same_folder_overwrite,
    edit_save_into_the_zoo_cache_overwrite,
]}


def _assert_one_clean_line(argv, code, err, mentions):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert code == 1, f"{argv}: exit {code}\n{err}"
    assert len(lines) == 1, f"{argv}\n{err}"
    assert "internal error" not in lines[0]
    assert any(m in lines[0] for m in mentions), f"{lines[0][:300]!r} names none of {mentions}"


@pytest.mark.parametrize("name", SURFACE_CASES)
def test_later_surfaces_refuse_bad_input_in_one_clean_line(name, corpus, surfaces, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQA_CONSTRAINTS_CACHE", str(tmp_path / "cache"))  # never the shared zoo cache
    argv, mentions = SURFACE_CASES[name](corpus, surfaces, tmp_path)
    roots = (corpus["root"], corpus["valid"]["{model}"], corpus["valid"]["{data}"], tmp_path)
    before = snapshot(*roots)
    code, err = run_cli(argv, capsys)
    _assert_one_clean_line(argv, code, err, mentions)
    assert snapshot(*roots) == before, f"{argv} left files behind or changed them"


def test_the_later_surfaces_baselines_succeed(corpus, surfaces, tmp_path, capsys):
    """The objects the cases break are valid: honest shards merge, the full logs prepare."""
    for folders in (("trace-1", "trace-0"), ("attention-0", "attention-1"), ("evaluate-0", "evaluate-1")):
        out = tmp_path / f"merged-{folders[0]}"
        code, err = run_cli(_merge(*(surfaces[f] for f in folders), out=out), capsys)
        assert code == 0, err
    # merged shards equal the unsharded run, byte for byte
    for name in ("traces.parquet", "trace_stats.json"):
        assert (tmp_path / "merged-trace-1" / name).read_bytes() == (surfaces["trace-all"] / name).read_bytes()
    assert ((tmp_path / "merged-evaluate-0" / "samples.jsonl").read_bytes()
            == (surfaces["evaluate-all"] / "samples.jsonl").read_bytes())
    code, err = run_cli(_prepare([surfaces["logs"]], corpus, tmp_path), capsys)
    assert code == 0, err


# --- every command on a corrupted file of each type it reads ---------------------------------------------------
#
# (command, file type, the object holding the file, which file in it): the file is overwritten with bytes that are
# no JSON, JSONL, parquet, safetensors or YAML (nor UTF-8 text), and the command must exit 1 naming it.

GARBAGE = bytes(range(256)) * 8
CORRUPT_FILES = [
    *[(command, kind, "{data}", name) for command in ("validate", "publish", "info", "evaluate", "trace", "attention",
                                                       "edit")
      for kind, name in (("parquet", "single_constraint/*.parquet"), ("yaml", "README.md"))],
    ("publish", "json", "{data}", "build_info.json"),
    ("info", "json", "{data}", "build_info.json"),
    *[(command, kind, "{model}", name) for command in ("evaluate", "trace", "attention", "edit")
      for kind, name in (("safetensors", "model.safetensors"), ("json", "config.json"))],
    ("evaluate", "json", "{out}", "run.json"),
    ("merge", "json", "{shard_run}", "run.json"),
    ("merge", "json", "{shard_run}", "results.json"),
    ("merge", "jsonl", "{shard_run}", "samples.jsonl"),
    ("merge-trace", "json", "trace-1", "trace_stats.json"),
    ("merge-trace", "parquet", "trace-1", "traces.parquet"),
    ("merge-attention", "json", "attention-1", "attention_stats.json"),
    ("merge-attention", "parquet", "attention-1", "attention_examples.parquet"),
    ("leaderboard-validate", "json", "{submission}", ""),
    ("leaderboard-validate", "jsonl", "{submissions}", "tiny.samples.jsonl"),
    ("leaderboard-validate-release", "json", "{release}", ""),
    ("leaderboard-build", "json", "{submissions}", "tiny.json"),
    ("leaderboard-build", "jsonl", "{submissions}", "tiny.samples.jsonl"),
    ("leaderboard-prepare", "json", "{run}", "results.json"),
    ("leaderboard-prepare", "jsonl", "{run}", "samples.jsonl"),
    ("leaderboard-prepare-lmms-eval", "jsonl", "logs", "model_samples_vqa_constraints_encyclopedic.jsonl"),
    *[("leaderboard-prepare-lmms-eval", kind, "{real_data}", name)
      for kind, name in (("parquet", "encyclopedic/*.parquet"), ("yaml", "README.md"))],
    *[("leaderboard-release", kind, "{real_data}", name)
      for kind, name in (("parquet", "single_constraint/*.parquet"), ("yaml", "README.md"))],
]


@pytest.mark.parametrize("command, kind, holder, name", CORRUPT_FILES, ids=lambda v: str(v).strip("{}") or "file")
def test_every_command_on_a_corrupted_file_of_each_type_exits_1(command, kind, holder, name, corpus, surfaces,
                                                                 tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"{out}": tmp_path / "out", "{out_file}": tmp_path / "release.json", **corpus["valid"]}
    if holder == "{out}":  # an earlier run folder in --out
        shutil.copytree(corpus["valid"]["{run}"], tmp_path / "out")
        original = tmp_path / "out"
    else:
        original = surfaces.get(holder) or values[holder]
        values[holder] = original = _copy(original, tmp_path, Path(original).name)
    files = [original] if not name else sorted(original.glob(name))
    assert files, (original, name)
    for path in files:
        path.write_bytes(GARBAGE)
    if command.startswith("merge-"):
        other = surfaces[holder.replace("-1", "-0")]
        argv = _merge(other, original, out=tmp_path / "merged")
    elif command == "leaderboard-prepare-lmms-eval":
        logs = original if holder == "logs" else surfaces["logs"]
        argv = _prepare([logs], {"valid": values}, tmp_path)
    elif command == "leaderboard-validate" and holder == "{submissions}":
        argv = _validate(original / "tiny.json", {"valid": values})
    else:
        argv = [str(values.get(a, a)) for a in COMMANDS[command].argv]
    before = snapshot(corpus["root"], tmp_path)
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert code == 1, f"{argv}: exit {code}\n{err}"
    assert len(lines) == 1 and "internal error" not in lines[0], err
    assert snapshot(corpus["root"], tmp_path) == before, f"{argv} left files behind or changed them"


def test_corrupted_files_cover_every_type_and_every_command_that_reads_files():
    kinds = {kind for _, kind, _, _ in CORRUPT_FILES}
    assert kinds == {"json", "jsonl", "parquet", "safetensors", "yaml"}
    commands = {command.split("-")[0] for command, *_ in CORRUPT_FILES}
    assert commands >= {"validate", "publish", "info", "evaluate", "trace", "attention", "edit", "merge", "leaderboard"}

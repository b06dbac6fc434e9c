"""The lmms-eval task in integrations/lmms_eval, checked without lmms-eval installed.

The YAML files parse (with lmms-eval's ``!function`` tag), every function they name exists, no task or group
is named like a folder of the repository root, `utils.py` imports only the standard library and its matcher
scores every bundled question (planted and flags builds) as the harness does, ``dataset_path`` follows
``VQA_CONSTRAINTS_DATASET_PATH``, and on a real build the task's prompts, targets and scores equal what
`vqa-constraints evaluate` gives on the same questions. ``leaderboard prepare --from-lmms-eval`` turns samples
shaped like lmms-eval's ``--log_samples`` output into a submission ``leaderboard validate`` accepts.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from harness_support import flags_data_dir, planted_adapter, small_run  # noqa: F401

from harness import scoring
from harness.leaderboard.checks import validate_submission
from harness.models.prompting import ANSWER_INSTRUCTION
from harness.leaderboard.release import release_from_data
from harness.runs import read_json
from vqa_constraints import CONFIGS, cli
from vqa_constraints.records import sha256_hex

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "integrations" / "lmms_eval"
GENERATION_KWARGS = {"until": ["\n"], "max_new_tokens": 16, "temperature": 0, "num_beams": 1}


class FunctionRef(str):
    """The target of a ``!function utils.name`` tag."""


class TaskLoader(yaml.SafeLoader):
    pass


TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))


def load_task_yaml(name: str) -> dict:
    """A task YAML with its ``include`` resolved (the task's own keys win), as lmms-eval reads it."""
    config = yaml.load((TASK_DIR / name).read_text(encoding="utf-8"), Loader=TaskLoader)
    if "include" in config:
        base = load_task_yaml(config.pop("include"))
        config = {**base, **config}
    return config


def function_refs(value) -> list[FunctionRef]:
    if isinstance(value, FunctionRef):
        return [value]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in function_refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in function_refs(item)]
    return []


def load_utils():
    """utils.py as lmms-eval loads it: from its file, not as part of any package."""
    spec = importlib.util.spec_from_file_location("vqa_constraints_lmms_eval_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def utils():
    return load_utils()


@pytest.fixture(scope="module")
def task_configs():
    return {config: load_task_yaml(f"vqa_constraints_{config}.yaml") for config in CONFIGS}


def test_yaml_parses_and_names_only_existing_functions(task_configs, utils):
    group = yaml.load((TASK_DIR / "vqa_constraints_all.yaml").read_text(encoding="utf-8"), Loader=TaskLoader)
    assert group["group"] == "vqa_constraints_all"
    assert group["task"] == [f"vqa_constraints_{config}" for config in CONFIGS]
    # lmms-eval reads `--tasks X` as a folder of YAML files when ./X exists: run from the repository root, no
    # task or group name may be an entry there.
    names = {group["group"], *group["task"]}
    assert not {path.name for path in ROOT.iterdir()} & names
    for config, task in task_configs.items():
        assert task["task"] == f"vqa_constraints_{config}" and task["dataset_name"] == config
        assert task["output_type"] == "generate_until" and task["test_split"] == "test"
        refs = function_refs(task)
        assert {"process_docs", "doc_to_visual", "doc_to_text", "doc_to_target", "process_results"} <= {
            ref.split(".", 1)[1] for ref in refs
        }
        assert task["dataset_path"] == "utils.DATASET_PATH"  # a string read from the environment, not a function
        for ref in refs:
            module, name = ref.split(".", 1)
            assert module == "utils" and (callable(getattr(utils, name)) or ref == task["dataset_path"]), ref
        # Every metric process_results returns has an aggregation, and the other way round.
        assert {m["metric"] for m in task["metric_list"]} == {"accuracy", "exact_match", "accuracy_visual", "accuracy_visual_textual"}
        assert task["generation_kwargs"] == GENERATION_KWARGS


def test_utils_imports_only_the_standard_library():
    tree = ast.parse((TASK_DIR / "utils.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_dataset_path_is_the_release_unless_the_environment_names_a_build(monkeypatch, tmp_path):
    monkeypatch.delenv("VQA_CONSTRAINTS_DATASET_PATH", raising=False)
    assert load_utils().DATASET_PATH == "ORG/vqa-constraints"
    monkeypatch.setenv("VQA_CONSTRAINTS_DATASET_PATH", str(tmp_path / "build"))
    assert load_utils().DATASET_PATH == str(tmp_path / "build")
    monkeypatch.setenv("VQA_CONSTRAINTS_DATASET_PATH", "  ")  # set but empty: the release
    assert load_utils().DATASET_PATH == "ORG/vqa-constraints"


def candidate_predictions(row: dict, other: dict) -> list[str]:
    """Raw decoded texts a model could give: each gold answer as is, in capitals, in a sentence, with
    punctuation and articles, glued to a neighbour, cut short, after a newline; and another question's answers."""
    texts = []
    for answer in row["answers"]:
        texts += [answer, f" {answer.upper()}.\nUSER: more", f"It is {answer}!", f"the {answer}, I think",
                  f"{answer}land", answer[: max(1, len(answer) // 2)], f"\n{answer}", f"A. {answer}"]
    texts += [*other["answers"], "", "   ", "I don't know"]
    return texts


@pytest.mark.parametrize("build", ["planted_data_dir", "flags_data_dir"])
def test_the_task_scores_every_bundled_question_as_the_harness(build, request, utils):
    """The matcher carried in utils.py equals harness.scoring's on every question of both bundled builds."""
    from vqa_constraints.loading import load_split

    assert utils.ANSWER_INSTRUCTION == ANSWER_INSTRUCTION
    data = request.getfixturevalue(build)
    checked = 0
    for config in CONFIGS:
        for split in sorted({path.name.split("-")[0] for path in (data / config).glob("*.parquet")}):
            rows = load_split(str(data), config, split).rows.select_columns(
                ["id", "question", "answers", "constraint_types"]).to_list()
            for index, row in enumerate(rows):
                other = rows[(index + 1) % len(rows)]
                assert utils.doc_to_text(row) == f"{row['question']} {ANSWER_INSTRUCTION}"
                for text in candidate_predictions(row, other):
                    cleaned = scoring.clean_generation(text)
                    assert utils.clean_generation(text) == cleaned
                    for answers in (row["answers"], other["answers"]):
                        assert utils.normalize_answer(cleaned) == scoring.normalize_answer(cleaned)
                        assert utils.answer_correct(cleaned, answers) == scoring.answer_correct(cleaned, answers)
                        assert utils.exact_match(cleaned, answers) == scoring.exact_match(cleaned, answers)
                    scores = utils.process_results(row, [text])
                    assert scores["accuracy"] == float(scoring.answer_correct(cleaned, row["answers"]))
                    assert scores["exact_match"] == float(scoring.exact_match(cleaned, row["answers"]))
                checked += 1
    assert checked > 500


def load_docs(data_dir: Path, config: str, utils, split: str = "test"):
    """The task's docs, as lmms-eval loads a local build (datasets.load_dataset, then process_docs).

    A cache folder per build: `datasets` keys a local folder's cache by its name, not its content.
    """
    cache = data_dir.parent / "lmms-eval-datasets-cache"
    return utils.process_docs(datasets.load_dataset(str(data_dir), config, split=split, cache_dir=str(cache)))


def llava_hf_prompt(tokenizer, context: str, utils) -> str:
    """What lmms-eval's llava_hf class renders (image token line, then the task's text) under our template."""
    messages = [{"role": "user", "content": f"<image>\n{context}"}]
    return tokenizer.apply_chat_template(
        messages, chat_template=utils.LLAVA_HF_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )


def test_task_matches_the_harness_on_a_real_build(planted_data_dir, small_run, planted_adapter, task_configs, utils):
    samples = [json.loads(line) for line in (small_run / "samples.jsonl").read_text().splitlines()]
    results = read_json(small_run / "results.json")
    kwargs = task_configs["single_constraint"]["lmms_eval_specific_kwargs"]["default"]
    for config in CONFIGS:
        docs = load_docs(planted_data_dir, config, utils)
        by_id = {doc["id"]: doc for doc in docs.select(range(min(40, len(docs))))}
        mine = [s for s in samples if s["config"] == config]
        assert mine
        items = []
        for sample in mine:
            doc = by_id[sample["id"]]
            assert [image.size for image in utils.doc_to_visual(doc)] == [doc["image"].size]
            prompt = llava_hf_prompt(planted_adapter.tokenizer, utils.doc_to_text(doc, kwargs), utils)
            assert sha256_hex(f"{prompt}\x1f{doc['image_id']}")[:16] == sample["prompt_hash"], prompt
            assert utils.doc_to_target(doc) == sample["answers"][0]
            # lmms-eval hands over the raw decoded text; anything after the first line is not the answer.
            scores = utils.process_results(doc, [f" {sample['prediction']}\nUSER: and more"])
            assert scores["accuracy"] == float(sample["correct"]) and scores["exact_match"] == float(sample["exact"])
            assert scores["accuracy_visual"]["id"] == sample["id"]
            items.append(scores["accuracy_visual"])
        by_type = results["metrics"][config]["by"]["constraint_types"]
        for name, aggregate in (("visual", utils.mean_visual), ("visual+textual", utils.mean_visual_textual)):
            if name in by_type:
                assert math.isclose(aggregate(items), by_type[name]["accuracy"]["value"], abs_tol=1e-6)
            else:
                assert math.isnan(aggregate(items))


def write_logged_samples(data_dir: Path, out: Path, utils, task_configs, split: str = "test") -> dict:
    """One ``--log_samples`` file per task, line for line as lmms-eval 0.7.3 writes them; id -> answer.

    Its evaluation tracker drops ``doc`` and ``arguments``, keeps the task's text as ``input``, unwraps a
    single response to a string (dropping ``resps`` when equal) and adds what process_results returned.
    """
    out.mkdir(parents=True, exist_ok=True)
    predictions = {}
    for config in CONFIGS:
        task = task_configs[config]
        docs = load_docs(data_dir, config, utils, split)
        kwargs = task["lmms_eval_specific_kwargs"]["default"]
        lines = []
        for doc_id, doc in enumerate(docs):
            # Half right, half wrong, raw as a model class decodes them (leading space, a further turn).
            answer = f" {doc['answers'][0]}\nUSER:" if doc_id % 2 == 0 else " no idea"
            predictions[doc["id"]] = answer
            line = {"doc_id": doc_id, "target": str(utils.doc_to_target(doc)), "filtered_resps": answer,
                    "token_counts": [None], "doc_hash": "0" * 64}
            line.update(utils.process_results(doc, [answer]))
            line["input"] = utils.doc_to_text(doc, kwargs)
            lines.append(json.dumps(line, ensure_ascii=False))
        (out / f"20261201_151721_samples_{task['task']}.jsonl").write_text("\n".join(lines) + "\n")
    return predictions


def test_prepare_from_lmms_eval_makes_a_valid_submission(flags_data_dir, task_configs, utils, tmp_path, capsys,
                                                        tiny_model_dirs):
    logs = tmp_path / "logs" / "llava-hf__llava-1.5-7b-hf"
    predictions = write_logged_samples(flags_data_dir, logs, utils, task_configs)
    out = tmp_path / "submissions"
    argv = ["leaderboard", "prepare", "--from-lmms-eval", str(logs.parent), "--data", str(flags_data_dir),
            # a model this machine has: the submission pins its revision (an unknown --model is refused)
            "--model", str(tiny_model_dirs("llava")), "--model-name", "llava 1.5 7b (lmms-eval)",
            "--submitted-by", "tests", "--out", str(out)]
    assert cli.run(argv) == 0
    submission = Path(capsys.readouterr().out.strip())
    assert validate_submission(submission, release_from_data(str(flags_data_dir), split="test")) == []
    data = json.loads(submission.read_text())
    assert data["submission"]["reproduce"]["command"].startswith("lmms-eval --model llava_hf")
    samples = [json.loads(line) for line in (out / data["submission"]["samples"]).read_text().splitlines()]
    assert len(samples) == len(predictions) == data["n"]
    right = sum(1 for qid, answer in predictions.items() if not answer.startswith(" no idea"))
    assert data["metrics"]["all"]["accuracy"]["value"] == pytest.approx(right / len(predictions), abs=1e-6)


def test_prepare_from_lmms_eval_refuses_a_log_of_other_data(flags_data_dir, task_configs, utils, tmp_path, capsys):
    logs = tmp_path / "logs"
    write_logged_samples(flags_data_dir, logs, utils, task_configs)
    path = logs / "20261201_151721_samples_vqa_constraints_single_constraint.jsonl"
    lines = path.read_text().splitlines()
    forged = json.loads(lines[3])
    forged["input"] = "What is the capital of Atlantis? Answer in a few words."
    lines[3] = json.dumps(forged)
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "submissions"
    argv = ["leaderboard", "prepare", "--from-lmms-eval", str(logs), "--data", str(flags_data_dir),
            "--model", "m", "--model-name", "m", "--submitted-by", "tests", "--out", str(out)]
    assert cli.run(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"{path} line 4 field 'input'" in err
    assert not out.exists() or not any(out.iterdir())

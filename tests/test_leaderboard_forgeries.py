"""Forged leaderboard submissions: every one is refused with one line naming the field; the honest one passes.

Each forgery starts from an honest submission (the planted model's full run of
the real flags validation split) and changes it the way a cheater would,
recomputing the metrics afterwards wherever that makes the forgery harder to see.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from harness_support import flags_data_dir, flags_validation_run, planted_adapter  # noqa: F401  (session fixtures)

from harness.leaderboard.checks import rerun_sample, validate_submission
from harness.leaderboard.release import release_from_data, write_release
from harness.leaderboard.submission import prepare_submission
from harness.results import compute_metrics
from harness.scoring import answer_correct, exact_match
from vqa_constraints import cli

MADE_UP_ID = "flags-0123456789abcdef"


@pytest.fixture(scope="module")
def release_file(flags_data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "release.json"
    write_release(path, release_from_data(str(flags_data_dir), split="validation"))
    return path


class Submission:
    """An honest submission in its own folder, with helpers to forge it."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text())
        self.samples_path = path.parent / self.data["submission"]["samples"]
        self.samples = [json.loads(line) for line in self.samples_path.read_text().splitlines()]

    def wrong(self) -> list[dict]:
        return [s for s in self.samples if not s["correct"]]

    def rescore(self, sample: dict) -> None:
        sample["correct"] = answer_correct(sample["prediction"], sample["answers"])
        sample["exact"] = exact_match(sample["prediction"], sample["answers"])

    def save(self, recompute: bool = True) -> None:
        if recompute:
            self.data["metrics"] = compute_metrics(self.samples, self.data["dataset"]["configs"], self.data["options"]["seed"])
        self.samples_path.write_text("".join(json.dumps(s) + "\n" for s in self.samples))
        self.path.write_text(json.dumps(self.data))


@pytest.fixture()
def honest(flags_validation_run, tmp_path):
    return Submission(prepare_submission(flags_validation_run, tmp_path / "subs", "honest model", "tests"))


def _elsewhere(sub: Submission) -> Path:
    outside = sub.path.parent.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    return Path(shutil.copy(sub.samples_path, outside / sub.samples_path.name))


# --- the forgeries: name -> (forge(sub), the field the refusal must name) ---------------------------------


def samples_removed(sub):
    del sub.data["submission"]["samples"]
    sub.save(recompute=False)


def samples_empty_name(sub):
    sub.data["submission"]["samples"] = ""
    sub.save(recompute=False)


def samples_file_empty(sub):
    sub.samples = []
    sub.save(recompute=False)


def samples_absolute_path(sub):
    sub.data["submission"]["samples"] = str(_elsewhere(sub))
    sub.save(recompute=False)


def samples_dotdot_path(sub):
    sub.data["submission"]["samples"] = f"../elsewhere/{_elsewhere(sub).name}"
    sub.save(recompute=False)


def samples_symlink_outside(sub):
    (sub.path.parent / "link.jsonl").symlink_to(_elsewhere(sub))
    sub.data["submission"]["samples"] = "link.jsonl"
    sub.save(recompute=False)


def gold_answers_rewritten(sub):
    for sample in sub.wrong():
        sample["answers"] = [sample["prediction"]]
        sub.rescore(sample)
    sub.save()


def null_prediction_marked_correct(sub):
    for sample in sub.wrong():
        sample.update(prediction=None, correct=True, exact=True)
    sub.save()


def correct_flag_flipped(sub):
    sub.wrong()[0]["correct"] = True
    sub.save()


def exact_flag_flipped(sub):
    sub.wrong()[0]["exact"] = True
    sub.save()


def correct_sample_cloned_under_made_up_id(sub):
    # the planted model gets no flag question right: make one right first, then clone it
    first = sub.samples[0]
    first["prediction"] = first["answers"][0]
    sub.rescore(first)
    sub.samples.append({**first, "id": MADE_UP_ID})
    sub.save()


def sample_repeated(sub):
    sub.samples.append(dict(sub.samples[0]))
    sub.save()


def wrong_sample_dropped(sub):
    sub.samples.remove(sub.wrong()[0])
    sub.data["dataset"]["sizes"] = {c: sum(s["config"] == c for s in sub.samples) for c in sub.data["dataset"]["configs"]}
    sub.save()


def question_text_changed(sub):
    sub.samples[0]["question"] = "What is 2 + 2?"
    sub.save()


def relation_relabelled(sub):
    sub.samples[0]["relation"] = "capital" if sub.samples[0]["relation"] != "capital" else "currency"
    sub.save()


def gold_logprob_raised(sub):
    sub.samples[0]["gold_logprob"] = 0.0
    sub.save()


def metric_edited(sub):
    sub.data["metrics"]["all"]["accuracy"]["value"] = 0.95
    sub.save(recompute=False)


def fingerprint_of_other_data(sub):
    sub.data["dataset"]["fingerprints"]["encyclopedic"] = "0" * 64
    sub.save(recompute=False)


def other_split(sub):
    sub.data["dataset"]["split"] = "test"
    sub.save(recompute=False)


def config_left_out(sub):
    sub.samples = [s for s in sub.samples if s["config"] != "encyclopedic"]
    sub.data["dataset"]["configs"].remove("encyclopedic")
    sub.save()


def made_with_limit(sub):
    sub.data["options"]["limit"] = 10
    sub.save(recompute=False)


def single_shard(sub):
    sub.data["options"]["shard"] = "0/2"
    sub.save(recompute=False)


def synthetic_source_added(sub):
    sub.data["metrics"]["all"]["by"]["source"]["planted"] = sub.data["metrics"]["all"]["by"]["source"]["flags"]
    sub.save(recompute=False)


def reproduction_record_removed(sub):
    del sub.data["submission"]["reproduce"]
    sub.save(recompute=False)


def sample_line_not_json(sub):
    sub.save(recompute=False)
    with open(sub.samples_path, "a") as handle:
        handle.write("{not json\n")


def predictions_rewritten_to_gold(sub):
    # Consistent in every data check: only re-running the model shows it (validate --rerun).
    for sample in sub.wrong():
        sample["prediction"] = sample["answers"][0]
        sub.rescore(sample)
    sub.save()


def log_probabilities_positive(sub):
    for sample in sub.samples:
        sample["answer_logprobs"] = [5.0] * len(sample["answers"])
        sample["gold_logprob"] = 5.0
    sub.save()


def _named(name):
    def forge(sub):
        sub.data["submission"]["model_name"] = name
        sub.save(recompute=False)
    return forge


model_name_cyrillic_look_alike = _named("honest m\u043edel")  # Cyrillic o
model_name_cyrillic_look_alike.__name__ = "model_name_cyrillic_look_alike"
model_name_whitespace_only = _named(" \t ")
model_name_whitespace_only.__name__ = "model_name_whitespace_only"
model_name_huge = _named("x" * 5_000_000)
model_name_huge.__name__ = "model_name_huge"
model_name_with_a_line_break = _named("honest\n| 1 | fake row")
model_name_with_a_line_break.__name__ = "model_name_with_a_line_break"


def submitted_by_huge(sub):
    sub.data["submission"]["submitted_by"] = "y" * 5_000_000
    sub.save(recompute=False)


def submission_file_symlinked_from_outside(sub):
    sub.save(recompute=False)
    outside = sub.path.parent.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    shutil.move(str(sub.samples_path), outside / sub.samples_path.name)
    shutil.move(str(sub.path), outside / sub.path.name)
    sub.path.symlink_to(outside / sub.path.name)


FORGERIES = {
    forge.__name__: (forge, field)
    for forge, field in [
        (samples_removed, "'samples' is a required property"),
        (samples_empty_name, "at submission.samples"),
        (samples_file_empty, "field 'submission.samples'"),
        (samples_absolute_path, "field 'submission.samples'"),
        (samples_dotdot_path, "field 'submission.samples'"),
        (samples_symlink_outside, "field 'submission.samples'"),
        (gold_answers_rewritten, "field 'answers'"),
        (null_prediction_marked_correct, "field 'prediction'"),
        (correct_flag_flipped, "field 'correct'"),
        (exact_flag_flipped, "field 'exact'"),
        (correct_sample_cloned_under_made_up_id, "field 'id'"),
        (sample_repeated, "field 'id'"),
        (wrong_sample_dropped, "field 'id'"),
        (question_text_changed, "field 'question'"),
        (relation_relabelled, "field 'config/source/relation/constraint_types/num_constraints'"),
        (gold_logprob_raised, "field 'gold_logprob'"),
        (metric_edited, "field 'metrics.all.accuracy.value'"),
        (fingerprint_of_other_data, "field 'dataset.fingerprints.encyclopedic'"),
        (other_split, "field 'dataset.split'"),
        (config_left_out, "field 'dataset.configs'"),
        (made_with_limit, "field 'options.limit'"),
        (single_shard, "field 'options.shard'"),
        (synthetic_source_added, "field 'metrics.all.by.source'"),
        (reproduction_record_removed, "'reproduce' is a required property"),
        (sample_line_not_json, "not valid JSON"),
        (predictions_rewritten_to_gold, "field 'prediction'"),
        (log_probabilities_positive, "field 'answer_logprobs'"),
        (model_name_cyrillic_look_alike, "field 'submission.model_name'"),
        (model_name_whitespace_only, "field 'submission.model_name'"),
        (model_name_huge, "field 'submission.model_name'"),
        (model_name_with_a_line_break, "field 'submission.model_name'"),
        (submitted_by_huge, "field 'submission.submitted_by'"),
        (submission_file_symlinked_from_outside, "a symbolic link"),
    ]
}
NEEDS_RERUN = {"predictions_rewritten_to_gold"}


def validate_cli(sub: Submission, release_file: Path, data: Path, capsys, rerun: int = 6,
                 seed: int | None = None) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.run(["leaderboard", "validate", str(sub.path), "--release", str(release_file),
                    "--rerun", str(rerun), "--rerun-data", str(data), "--device", "cpu",
                    *(["--rerun-seed", str(seed)] if seed is not None else [])])
    return code, capsys.readouterr().out.splitlines()


def drawn(lines: list[str]) -> tuple[int, list[str]]:
    """The seed and question ids of the one ``rerun`` line validate printed."""
    [line] = [line for line in lines if line.startswith("rerun ")]
    return int(re.search(r"--rerun-seed (\d+)", line).group(1)), line.split(": ")[-1].split()


def test_the_honest_submission_passes_every_check_and_a_rerun(honest, release_file, flags_data_dir, capsys):
    code, lines = validate_cli(honest, release_file, flags_data_dir, capsys)
    assert code == 0, lines
    seed, ids = drawn(lines)
    assert len(ids) == 6 and len(set(ids)) == 6
    assert lines[-1] == f"ok   {honest.path} (and 6 questions re-scored, --rerun-seed {seed})"


def test_the_rerun_sample_is_drawn_fresh_and_can_be_repeated(honest, release_file, flags_data_dir, capsys):
    """No seed a submitter could know: every validation draws its own, and prints it so it can be repeated."""
    draws = [drawn(validate_cli(honest, release_file, flags_data_dir, capsys, rerun=3)[1]) for _ in range(3)]
    assert len({seed for seed, _ in draws}) == 3
    assert len({tuple(ids) for _, ids in draws}) > 1  # 3 of 159 questions: equal draws would be a broken sampler
    seed, ids = draws[0]
    code, lines = validate_cli(honest, release_file, flags_data_dir, capsys, rerun=3, seed=seed)
    assert code == 0 and drawn(lines) == (seed, ids)


def test_predictions_honest_only_where_a_known_seed_looks_are_caught(honest, release_file, flags_data_dir, capsys):
    """The forgery a fixed seed let through: keep the questions that seed re-runs honest, rewrite the rest."""
    kept = {s["id"] for s in rerun_sample(honest.samples, 6, seed=0)}
    for sample in honest.wrong():
        if sample["id"] not in kept:
            sample["prediction"] = sample["answers"][0]
            honest.rescore(sample)
    honest.save()
    assert validate_cli(honest, release_file, flags_data_dir, capsys, seed=0)[0] == 0  # the known draw: blind
    code, lines = validate_cli(honest, release_file, flags_data_dir, capsys, seed=1)  # any other draw sees it
    assert code == 1 and any("field 'prediction'" in line and line.startswith("FAIL ") for line in lines), lines


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_each_forgery_is_refused_naming_the_field(name, honest, release_file, flags_data_dir, capsys):
    forge, field = FORGERIES[name]
    forge(honest)
    # the rerun must sample a forged row: re-score every question when only the rerun can tell
    code, lines = validate_cli(honest, release_file, flags_data_dir, capsys, rerun=200 if name in NEEDS_RERUN else 0)
    assert code == 1
    lines = [line for line in lines if not line.startswith("rerun ")]  # which questions the rerun drew
    assert lines and all(line.startswith("FAIL ") for line in lines), lines
    assert any(field in line for line in lines), lines


def test_rewritten_predictions_pass_the_data_checks(honest, release_file):
    """What the docs say: a rewritten prediction cannot be caught by data checks alone."""
    from harness.leaderboard.release import load_release

    predictions_rewritten_to_gold(honest)
    assert validate_submission(honest.path, load_release(release_file)) == []

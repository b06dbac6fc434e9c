"""Building the bundled sources: Hub layout, load_dataset round trip, determinism, card, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from vqa_constraints import CONFIGS
from vqa_constraints.builder import build
from vqa_constraints.cli import run
from vqa_constraints.loading import load_split
from vqa_constraints.publish import files_to_upload
from vqa_constraints.sources.planted_world import VISUAL_PHRASE, PlantedWorld
from vqa_constraints.validation import validate_folder


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    """Both bundled sources (named: the default build is flags only), built once through the CLI as a user would."""
    out = tmp_path_factory.mktemp("full") / "vqa"
    assert run(["build", "--out", str(out), "--sources", "flags,planted", "--seed", "0"]) == 0
    return out


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text("utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hub_layout_and_card_yaml(full_build):
    configs = front_matter(full_build)["configs"]
    assert [c["config_name"] for c in configs] == list(CONFIGS)
    assert [c["config_name"] for c in configs if c.get("default")] == ["single_constraint"]
    listed = sorted(p for c in configs for entry in c["data_files"] for p in entry["path"])
    present = sorted(p.relative_to(full_build).as_posix() for p in full_build.rglob("*.parquet"))
    assert listed == present
    for config in CONFIGS:
        assert (full_build / config / "test-00000-of-00001.parquet").is_file()
        assert (full_build / config / "validation-00000-of-00001.parquet").is_file()
    card = (full_build / "README.md").read_text("utf-8")
    for heading in ("## Dataset summary", "## Configs", "## Fields", "## Sources and licences", "## Citation"):
        assert heading in card
    assert "{{" not in card  # every placeholder rendered


@pytest.mark.parametrize("config", CONFIGS)
def test_load_dataset_round_trip_decodes_images(full_build, config):
    dataset = datasets.load_dataset(str(full_build), config)
    assert set(dataset) == {"test", "validation"}
    row = dataset["test"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size[0] > 0
    assert row["config"] == config
    assert set(dataset["test"]["source"]) == {"flags", "planted"}
    assert len(dataset["test"][0]["constraints"]) >= 1


def test_ids_unique_across_configs(full_build):
    import pyarrow.parquet as pq

    ids = [i for shard in full_build.rglob("*.parquet") for i in pq.read_table(shard, columns=["id"])["id"].to_pylist()]
    assert len(ids) == len(set(ids)) > 1500


def test_full_build_is_valid_and_info_lists_it(full_build, capsys):
    assert validate_folder(full_build) == []
    assert run(["validate", str(full_build)]) == 0
    assert run(["info", str(full_build)]) == 0
    out = capsys.readouterr().out
    for config in CONFIGS:
        assert config[:12] in out
    info = json.loads((full_build / "build_info.json").read_text())
    assert info["rows_by_source"]["flags"] > 1000 and info["rows_by_source"]["planted"] > 500


def test_default_build_is_real_world_and_its_card_says_what_it_holds(tmp_path):
    out = tmp_path / "default"
    assert run(["build", "--out", str(out)]) == 0
    info = json.loads((out / "build_info.json").read_text())
    assert info["sources"] == ["flags"] and info["rows_by_source"] == {"flags": 1318}
    assert front_matter(out)["pretty_name"] == "VQA-Constraints"
    card = (out / "README.md").read_text("utf-8")
    assert "| `flags` | real-world | flag images: flagpy (MIT); country facts: countryinfo (MIT) | 1318 |" in card
    assert "can serve as a leaderboard release" in card and "## Rebuilding the paper's VQA-Constraints" in card


def test_planted_and_mixed_builds_are_named_and_marked(planted_data_dir, full_build):
    card = (planted_data_dir / "README.md").read_text("utf-8")
    assert front_matter(planted_data_dir)["pretty_name"] == "VQA-Constraints planted world (synthetic)"
    assert "\n# VQA-Constraints planted world (synthetic)\n" in card
    assert "| `planted` | synthetic | CC0-1.0" in card and "not a benchmark of real models" in card
    mixed = (full_build / "README.md").read_text("utf-8")
    assert front_matter(full_build)["pretty_name"].startswith("VQA-Constraints with the planted world")
    assert "| `flags` | real-world |" in mixed and "| `planted` | synthetic |" in mixed and "refuses such builds" in mixed


def test_the_cards_paper_rebuild_command_runs_as_written(tmp_path, monkeypatch):
    """The card's build command, on the adapters' fixtures laid out under the file names it uses."""
    fixtures = Path(__file__).parent / "fixtures" / "dataset"
    paper = tmp_path / "paper"
    layout = {
        "MLLMInterpret/data_constraints/multimodal_known.csv": "mllminterpret/multimodal_known.csv",
        "MLLMInterpret/data_constraints/multimodal_movies.csv": "mllminterpret/multimodal_movies.csv",
        "MLLMInterpret/data_constraints/okvqa.csv": "okvqa/okvqa.csv",
        "known_1000.json": "mllminterpret/known_1000.json",
        "known_images": "mllminterpret/images",
        "director_movies.json": "mllminterpret/director_movies.json",
        "movie_images": "mllminterpret/images",
        "OpenEnded_mscoco_val2014_questions.json": "okvqa/OpenEnded_mscoco_val2014_questions.json",
        "mscoco_val2014_annotations.json": "okvqa/mscoco_val2014_annotations.json",
        "val2014": "okvqa/val2014",
        "test.csv": "encyclopedic_vqa/test.csv",
        "evqa_images": "encyclopedic_vqa",
    }
    for target, source in layout.items():
        (paper / target).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (fixtures / source).is_dir() else shutil.copy
        copy(fixtures / source, paper / target)
    card = (Path(__file__).parent.parent / "dataset_card.md").read_text("utf-8")
    section = card[card.index("## Rebuilding the paper's VQA-Constraints") :]
    command = section[section.index("vqa-constraints build") : section.index("vqa-constraints validate")]
    argv = command.replace("\\\n", " ").split()
    monkeypatch.chdir(tmp_path)
    assert run(argv[1:]) == 0
    assert run(["validate", "data/paper"]) == 0
    info = json.loads((tmp_path / "data" / "paper" / "build_info.json").read_text())
    assert set(info["sources"]) == {"mllminterpret-known", "mllminterpret-movies", "okvqa", "encyclopedic-vqa"}
    assert all(info["rows_by_source"][s] > 0 for s in info["sources"])


def test_planted_records_follow_the_world(planted_data_dir):
    world = PlantedWorld(seed=0)
    known = {e.name: e for e in world.by_role("known")}
    longtail = {e.name: e for e in world.by_role("longtail")}
    single = load_split(str(planted_data_dir), "single_constraint", "test")
    record = single.record(0)
    entity = known[record.subject]
    assert record.answers == [entity.facts[record.relation]]
    visual = record.visual_constraints[0]
    assert visual.text == VISUAL_PHRASE and record.question[visual.char_start : visual.char_end] == VISUAL_PHRASE
    assert record.text_only_question == record.question.replace(VISUAL_PHRASE, entity.name)
    assert len(record.other_views) == 2
    assert record.image.tobytes() == world.view(entity, 0).tobytes()
    assert record.other_views[0].tobytes() != record.image.tobytes()
    multi = load_split(str(planted_data_dir), "multi_constraint", "test").record(0)
    question, region, answers = world.visited_question(known[multi.subject])
    assert (multi.question, multi.answers, multi.answer_mode) == (question, answers, "any_of")
    assert [c.type for c in multi.constraints] == ["visual", "textual"]
    encyclopedic = load_split(str(planted_data_dir), "encyclopedic", "test")
    assert all(r.subject in longtail for r in encyclopedic.records())
    # subjects never straddle splits
    validation = load_split(str(planted_data_dir), "single_constraint", "validation")
    assert {r.subject for r in validation.records()}.isdisjoint({r.subject for r in single.records()})


def test_same_seed_rebuild_is_byte_identical_and_replaces_in_place(planted_data_dir, tmp_path):
    again = tmp_path / "again"
    build(again, sources=["planted"], seed=0)
    shards = sorted(p.relative_to(planted_data_dir) for p in planted_data_dir.rglob("*.parquet"))
    assert shards == sorted(p.relative_to(again) for p in again.rglob("*.parquet"))
    for shard in shards:
        assert sha256(planted_data_dir / shard) == sha256(again / shard), shard
    assert (planted_data_dir / "README.md").read_bytes() == (again / "README.md").read_bytes()

    # A rebuild over an existing build replaces it whole: stale shards go, no temp folders stay.
    (again / "single_constraint" / "stale-00000-of-00001.parquet").write_bytes(b"old")
    build(again, sources=["planted"], seed=1)
    assert not (again / "single_constraint" / "stale-00000-of-00001.parquet").exists()
    assert sha256(again / shards[0]) != sha256(planted_data_dir / shards[0])
    assert validate_folder(again) == []
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_publish_dry_run_prints_exact_file_list(planted_data_dir, capsys):
    assert run(["publish", str(planted_data_dir), "--repo-id", "someone/vqa-constraints", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("dry run: would upload 8 files")
    assert lines[1:] == files_to_upload(planted_data_dir)
    assert lines[1:] == sorted(
        ["README.md", "build_info.json"]
        + [f"{c}/{s}-00000-of-00001.parquet" for c in CONFIGS for s in ("test", "validation")]
    )


def test_publish_refuses_an_invalid_build(planted_data_dir, tmp_path, capsys):
    out = tmp_path / "vqa"
    shutil.copytree(planted_data_dir, out)
    (out / "encyclopedic" / "validation-00000-of-00001.parquet").unlink()
    assert run(["publish", str(out), "--repo-id", "someone/x", "--dry-run"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not valid" in errors[0] and "validation-00000-of-00001.parquet" in errors[0]


def test_subjects_file_keeps_only_those_subjects_and_an_unknown_one_is_a_one_line_error(full_build, tmp_path, capsys):
    """How the demo studies flag-llava on its held-out countries only."""
    split = load_split(str(full_build), "single_constraint")
    everyone = sorted({subject for subject, source in zip(split.rows["subject"], split.rows["source"]) if source == "flags"})
    chosen = everyone[:3]
    listed = tmp_path / "subjects.txt"
    listed.write_text("\n".join(chosen) + "\n\n")
    out = tmp_path / "heldout"
    assert run(["build", "--out", str(out), "--sources", "flags", "--subjects", str(listed)]) == 0
    info = json.loads((out / "build_info.json").read_text())
    assert info["subjects"] == chosen and "single_constraint/test" in info["rows"]
    for config in {key.split("/")[0] for key in info["rows"]}:
        subjects = set(load_split(str(out), config).rows["subject"])
        assert subjects and subjects <= set(chosen), config
    capsys.readouterr()
    listed.write_text(f"{chosen[0]}\nAtlantis\n")
    assert run(["build", "--out", str(tmp_path / "bad"), "--sources", "flags", "--subjects", str(listed)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Atlantis" in error and not (tmp_path / "bad").exists()

"""Bad input: one-line error naming file/row/field, exit 1, no output folder; --skip-invalid skips and reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vqa_constraints.cli import run
from vqa_constraints.validation import validate_folder

FIXTURES = Path(__file__).parent / "fixtures" / "dataset"


@pytest.fixture
def inputs(tmp_path):
    """A private copy of the adapter fixtures that a test may break."""
    root = tmp_path / "inputs"
    shutil.copytree(FIXTURES, root)
    return root


def known_args(inputs: Path) -> list[str]:
    return ["--sources", "mllminterpret-known", "--source-path",
            f"mllminterpret-known={inputs / 'mllminterpret' / 'multimodal_known.csv'}"]


def build_fails(args: list[str], out: Path, capsys) -> str:
    """Run build expecting failure; return the single error line."""
    assert run(["build", "--out", str(out), *args]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err
    assert not out.exists(), "no partial output folder"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "no temp folder left"
    return errors[0]


def edit_csv(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert old in text
    path.write_text(text.replace(old, new), "utf-8")


def test_missing_column(inputs, tmp_path, capsys):
    csv_path = inputs / "mllminterpret" / "multimodal_known.csv"
    edit_csv(csv_path, ",question,subject,main_entity,image_url", ",question,subject,entity,image_url")
    error = build_fails(known_args(inputs), tmp_path / "out", capsys)
    assert str(csv_path) in error and "missing column 'main_entity'" in error


def test_constraint_text_not_in_question(inputs, tmp_path, capsys):
    csv_path = inputs / "mllminterpret" / "multimodal_known.csv"
    edit_csv(csv_path, "Vinson Massif,This mountain,", "Vinson Massif,This glacier,")
    error = build_fails(known_args(inputs), tmp_path / "out", capsys)
    assert f"{csv_path} row 2 field 'main_entity'" in error and "'This glacier' does not occur" in error


def test_missing_image(inputs, tmp_path, capsys):
    (inputs / "mllminterpret" / "images" / "A photo of MacApp.jpg").unlink()
    error = build_fails(known_args(inputs), tmp_path / "out", capsys)
    assert "row 4 field 'image_url'" in error and "'./A photo of MacApp' not found" in error


def test_unreadable_image(inputs, tmp_path, capsys):
    (inputs / "mllminterpret" / "images" / "A photo of Space Needle.jpg").write_bytes(b"\xff\xd8 truncated")
    error = build_fails(known_args(inputs), tmp_path / "out", capsys)
    assert "row 1 field 'image_url'" in error and "cannot be read" in error


def test_duplicate_id(inputs, tmp_path, capsys):
    csv_path = inputs / "mllminterpret" / "multimodal_movies.csv"
    with open(csv_path, "a", encoding="utf-8") as handle:
        handle.write("3,Name a movie directed by this director?,Ron Fricke,this director,./A photo of Ron Fricke\n")
    args = ["--sources", "mllminterpret-movies", "--source-path", f"mllminterpret-movies={csv_path}"]
    error = build_fails(args, tmp_path / "out", capsys)
    assert "field 'id'" in error and "duplicate id" in error


def test_empty_answer(inputs, tmp_path, capsys):
    known = inputs / "mllminterpret" / "known_1000.json"
    facts = json.loads(known.read_text())
    next(f for f in facts if f["subject"] == "Audible.com")["attribute"] = " "
    known.write_text(json.dumps(facts))
    error = build_fails(known_args(inputs), tmp_path / "out", capsys)
    assert "row 3 field 'answers'" in error and "empty attribute" in error


def test_empty_answer_from_okvqa_annotations(inputs, tmp_path, capsys):
    annotations = inputs / "okvqa" / "mscoco_val2014_annotations.json"
    data = json.loads(annotations.read_text())
    for answer in data["annotations"][0]["answers"]:
        answer["answer"] = ""
    annotations.write_text(json.dumps(data))
    args = ["--sources", "okvqa", "--source-path", f"okvqa={inputs / 'okvqa' / 'okvqa.csv'}"]
    error = build_fails(args, tmp_path / "out", capsys)
    assert "okvqa.csv row 1 field 'answers'" in error


def test_source_path_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "multimodal_known.csv"
    args = ["--sources", "mllminterpret-known", "--source-path", f"mllminterpret-known={missing}"]
    error = build_fails(args, tmp_path / "out", capsys)
    assert f"{missing} does not exist" in error


def test_unknown_source_and_missing_path(tmp_path, capsys):
    assert "unknown source 'imagenet'" in build_fails(["--sources", "imagenet"], tmp_path / "a", capsys)
    assert "needs --source-path okvqa=PATH" in build_fails(["--sources", "okvqa"], tmp_path / "b", capsys)


def test_refuses_to_overwrite_a_folder_that_is_not_a_build(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run(["build", "--out", str(out), "--sources", "planted"]) == 1
    assert "is not a VQA-Constraints build" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_skip_invalid_skips_reports_and_writes_only_valid_rows(inputs, tmp_path, capsys):
    mll = inputs / "mllminterpret"
    edit_csv(mll / "multimodal_known.csv", "Vinson Massif,This mountain,", "Vinson Massif,This glacier,")
    (mll / "images" / "A photo of MacApp.jpg").unlink()
    (mll / "images" / "A photo of Space Needle.jpg").write_bytes(b"garbage")
    with open(mll / "multimodal_movies.csv", "a", encoding="utf-8") as handle:
        handle.write("3,Name a movie directed by this director?,Ron Fricke,this director,./A photo of Ron Fricke\n")
    out = tmp_path / "out"
    code = run([
        "build", "--out", str(out), "--skip-invalid",
        "--sources", "mllminterpret-known,mllminterpret-movies",
        "--source-path", f"mllminterpret-known={mll / 'multimodal_known.csv'}",
        "--source-path", f"mllminterpret-movies={mll / 'multimodal_movies.csv'}",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 4 invalid rows" in printed
    for reason in ("does not occur in the question", "not found under", "cannot be read", "duplicate id"):
        assert reason in printed
    assert validate_folder(out) == []
    info = json.loads((out / "build_info.json").read_text())
    assert info["rows"] == {"single_constraint/test": 3 + 3} and info["skipped"] == 4


def test_console_script_exits_1_with_one_line_and_no_traceback(tmp_path):
    missing = tmp_path / "missing.csv"
    script = Path(sys.executable).with_name("vqa-constraints")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from vqa_constraints.cli import main; main()"]
    result = subprocess.run(
        [*command, "build", "--out", str(tmp_path / "out"), "--source-path", f"okvqa={missing}"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --source-path okvqa: {missing} does not exist"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

"""No command deletes a user's files: `edit --save` and `zoo build --out` refuse folders they did not write;
`publish` uploads only the files a build wrote, with their hashes checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.outputs import MARKER, check_output_folder
from harness.zoo.cache import ZOO_COMMAND, cache_root, export
from vqa_constraints import cli
from vqa_constraints.builder import build
from vqa_constraints.errors import UserError


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    code = cli.run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def thesis_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}\n")
    return path


# --- the folder check itself ---------------------------------------------------------


def test_a_folder_of_someone_elses_files_needs_overwrite(tmp_path):
    thesis = thesis_folder(tmp_path / "thesis")
    with pytest.raises(UserError, match="not written by `cmd`.*--overwrite"):
        check_output_folder(thesis, "--out", "cmd")
    assert check_output_folder(thesis, "--out", "cmd", overwrite=True) == thesis
    (thesis / MARKER).write_text(json.dumps({"command": "other"}))
    with pytest.raises(UserError, match="not written by `cmd`"):
        check_output_folder(thesis, "--out", "cmd")
    (thesis / MARKER).write_text(json.dumps({"command": "cmd"}))
    assert check_output_folder(thesis, "--out", "cmd") == thesis  # an earlier output of the same command
    assert check_output_folder(tmp_path / "new", "--out", "cmd") == tmp_path / "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_output_folder(tmp_path / "file", "--out", "cmd", overwrite=True)


def test_protected_folders_are_refused_even_with_overwrite(tmp_path, monkeypatch):
    model = tmp_path / "models" / "llava"
    model.mkdir(parents=True)
    protected = [(model, "the model's folder")]
    for target in (model, model.parent, tmp_path, model / "edited"):
        with pytest.raises(UserError, match="the model's folder"):
            check_output_folder(target, "--save", "cmd", True, protected)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    for target in (".", "..", work.parent):
        with pytest.raises(UserError, match="the working directory"):
            check_output_folder(target, "--save", "cmd", overwrite=True)
    with pytest.raises(UserError, match="home folder"):
        check_output_folder(Path.home(), "--save", "cmd", overwrite=True)
    assert check_output_folder(work / "sub" / "out", "--save", "cmd") == work / "sub" / "out"


# --- edit --save ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava_copy(tiny_model_dirs, tmp_path_factory):
    """A private copy of a tiny checkpoint under models/, so a failing test can never touch a shared one."""
    model = tmp_path_factory.mktemp("models") / "tiny-llava"
    shutil.copytree(tiny_model_dirs("llava"), model)
    return model


def edit_args(model, data, out, save, *extra):
    return ["edit", "--model", model, "--data", data, "--out", out, "--save", save, "--layers", "1", "--limit", "1",
            "--specificity-size", "2", "--key-position", "constraint", "--dtype", "float32", "--device", "cpu", *extra]


def test_edit_save_keeps_a_thesis_and_never_deletes_the_model(tiny_llava_copy, planted_data_dir, tmp_path, capsys):
    thesis = thesis_folder(tmp_path / "thesis")
    code, err, _ = run_cli(edit_args(tiny_llava_copy, planted_data_dir, tmp_path / "run", thesis), capsys)
    assert code == 1 and len(err) == 1 and "--overwrite" in err[0]
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]
    assert not (tmp_path / "run").exists()  # refused before any editing

    files = sorted(p.name for p in tiny_llava_copy.iterdir())
    for target in (tiny_llava_copy, tiny_llava_copy.parent):
        code, err, _ = run_cli(edit_args(tiny_llava_copy, planted_data_dir, tmp_path / "run", target, "--overwrite"),
                               capsys)
        assert code == 1 and len(err) == 1 and "the model's own folder" in err[0]
    assert sorted(p.name for p in tiny_llava_copy.iterdir()) == files


def test_edit_save_writes_a_marked_model_and_may_replace_its_own_output(tiny_llava_copy, planted_data_dir, tmp_path,
                                                                        capsys):
    saved = tmp_path / "edited"
    for run in ("first", "again"):
        code, err, _ = run_cli(edit_args(tiny_llava_copy, planted_data_dir, tmp_path / run, saved), capsys)
        assert code == 0, err
        assert json.loads((saved / MARKER).read_text())["command"] == "vqa-constraints edit --save"
        assert (saved / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


# --- zoo build --out -----------------------------------------------------------------


def test_zoo_export_refuses_user_folders_and_the_cache(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    model = tiny_model_dirs("llava")
    out = export(model, tmp_path / "copy")
    assert json.loads((out / MARKER).read_text())["command"] == ZOO_COMMAND
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert export(model, out) == out  # an earlier copy is replaced

    thesis = thesis_folder(tmp_path / "thesis")
    with pytest.raises(UserError, match="--overwrite"):
        export(model, thesis)
    assert (thesis / "thesis.tex").exists()
    export(model, thesis, overwrite=True)
    assert not (thesis / "thesis.tex").exists() and (thesis / "config.json").exists()
    for target in (cache_root(), cache_root().parent):
        with pytest.raises(UserError, match="zoo cache"):
            export(model, target, overwrite=True)
    monkeypatch.chdir(tmp_path / "copy")
    with pytest.raises(UserError, match="working directory"):
        export(model, ".", overwrite=True)

    # The command refuses before it builds anything.
    other = thesis_folder(tmp_path / "other")
    code, err, _ = run_cli(["zoo", "build", "planted", "--quick", "--out", other], capsys)
    assert code == 1 and len(err) == 1 and "--overwrite" in err[0]
    assert sorted(p.name for p in other.iterdir()) == ["thesis.tex"]


# --- publish ---------------------------------------------------------------------------


@pytest.fixture
def small_build(tmp_path) -> Path:
    return build(tmp_path / "data", sources=["planted"], seed=0).out_dir


def publish_args(folder):
    return ["publish", folder, "--repo-id", "someone/vqa-constraints", "--dry-run"]


def test_publish_lists_exactly_the_files_the_build_wrote(small_build, capsys):
    code, err, out = run_cli(publish_args(small_build), capsys)
    assert code == 0, err
    listed = json.loads((small_build / "build_info.json").read_text())["files"]
    assert set(listed) == {p.relative_to(small_build).as_posix() for p in small_build.rglob("*")
                           if p.is_file() and p.name != "build_info.json"}
    assert out.strip().splitlines()[1:] == sorted([*listed, "build_info.json"])


@pytest.mark.parametrize("stray", ["file", "hidden file", "symlink to a file", "symlink to a folder"])
def test_publish_refuses_stray_files_and_symlinks(small_build, tmp_path, capsys, stray):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "token.txt").write_text("hf_xxx")
    if stray == "file":
        path = small_build / "single_constraint" / "notes.txt"
        path.write_text("draft")
    elif stray == "hidden file":
        path = small_build / ".env"
        path.write_text("HF_TOKEN=hf_xxx")
    elif stray == "symlink to a file":
        path = small_build / "single_constraint" / "extra.parquet"
        path.symlink_to(outside / "token.txt")
    else:
        path = small_build / "linked"
        path.symlink_to(outside, target_is_directory=True)
    code, err, out = run_cli(publish_args(small_build), capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0]
    assert "symbolic link" in err[0] if "symlink" in stray else "not written by the build" in err[0]
    assert "would upload" not in out


@pytest.mark.parametrize("change", ["shard edited", "shard missing", "path outside", "no file list"])
def test_publish_checks_the_build_info_file_list(small_build, capsys, change):
    info_path = small_build / "build_info.json"
    info = json.loads(info_path.read_text())
    shard = small_build / "single_constraint" / "test-00000-of-00001.parquet"
    if change == "shard edited":
        shard.write_bytes(shard.read_bytes() + b"\0")
        expected = "has changed since the build"
    elif change == "shard missing":
        shard.unlink()
        expected = "which is missing"
    elif change == "path outside":
        info["files"]["../escape.txt"] = "0" * 64
        expected = "not a file inside the build"
    else:
        del info["files"]
        expected = "no 'files' list"
    info_path.write_text(json.dumps(info))
    code, err, _ = run_cli(publish_args(small_build), capsys)
    assert code == 1 and len(err) == 1 and expected in err[0]

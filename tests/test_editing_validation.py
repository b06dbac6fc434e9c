"""Every automatic choice (key position, FT-L's bound) is made on the validation split and never sees the
reported requests or specificity questions: changing the test split leaves the choices byte for byte the same;
changing the validation split changes the evidence they were made on."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from editing.runner import EditOptions, run_editing


@pytest.fixture(scope="module")
def tiny_llava(tiny_model_dirs):
    from harness.models.loading import load_model

    return load_model(tiny_model_dirs("llava"), dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQA_CONSTRAINTS_CACHE", str(tmp_path / "cache"))


def _with_rows_reversed(source, target, split: str):
    """A copy of the build whose ``split`` shards (every config) hold their rows in reverse order, minus the last."""
    shutil.copytree(source, target)
    for shard in target.glob(f"*/{split}-*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.take(list(range(table.num_rows - 1, 0, -1))), shard)
    return target


def _choices(adapter, data, out, **changes):
    options = EditOptions(methods=["ft-l"], track="insertion", layers=[1], key_position="auto", validation_size=2,
                          neighbours=2, method_options={"ft-l": {"steps": 2}}, **{"limit": 2, "specificity_size": 4,
                                                                                    **changes})
    document = run_editing(adapter, str(data), out, options)
    return document["choices"], document


def test_choices_see_only_the_validation_split(tiny_llava, planted_data_dir, tmp_path):
    base, document = _choices(tiny_llava, planted_data_dir, tmp_path / "a")
    assert base["split"] == "validation" and base["requests"] == 2
    assert set(base["parameters"]["ft-l"]) == {"linf_rms"}  # tuned by default
    assert document["key_position"] == base["key_position"]["chosen"]
    assert "on the validation split" in document["key_position_source"]
    # Other reported requests and specificity questions (another limit and sample size, and a test split whose
    # rows are reordered): the same choices, made on the same evidence.
    other_test = _with_rows_reversed(planted_data_dir, tmp_path / "other-test", "test")
    same, other_document = _choices(tiny_llava, other_test, tmp_path / "b", limit=3, specificity_size=6)
    assert other_document["data"]["fingerprint"] != document["data"]["fingerprint"]
    # The validation split's fingerprint is the same; the folder and the whole build's file hash are not.
    for key in ("data", "files_sha256"):
        assert same["data"].pop(key) != base["data"].pop(key)
    assert same == base
    # Another validation split: the evidence (and so possibly the choice) changes.
    other_validation = _with_rows_reversed(planted_data_dir, tmp_path / "other-validation", "validation")
    changed, _ = _choices(tiny_llava, other_validation, tmp_path / "c")
    assert changed["data"]["fingerprint"] != base["data"]["fingerprint"]
    assert changed["key_distinctness"] != base["key_distinctness"]

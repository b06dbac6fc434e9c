"""The editing track on the planted-knowledge model, whose facts sit in a known MLP layer K.

One run of 30+ insertion edits with a layer sweep is shared by most tests;
ground truth: MultEdit at K must insert the facts (efficacy, generalization
to paraphrases and other views) without disturbing unrelated answers, and the
sweep must peak at or next to K.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest

from editing.methods import weights_hash
from editing.runner import EditOptions, results_schema, run_editing
from harness.scoring import answer_correct

N_EDITS = 30


def _files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(planted_model_dir):
    from harness.models.loading import load_model

    return load_model(planted_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def insertion_run(planted, planted_model_dir, planted_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-insertion")
    files_before = _files_digest(planted_model_dir)
    weights_before = weights_hash(planted.model)
    options = EditOptions(methods=["multedit"], track="insertion", key_position="last", limit=N_EDITS,
                          specificity_size=24, trace_limit=12, validation_size=4)
    document = run_editing(planted, str(planted_data_dir), out, options)
    return {
        "document": document,
        "out": out,
        "files_unchanged": _files_digest(planted_model_dir) == files_before,
        "weights_unchanged": weights_hash(planted.model) == weights_before,
    }


def test_multedit_inserts_facts_at_the_planted_layer(insertion_run, planted):
    document = insertion_run["document"]
    planted_layer = planted.model.config.planted_layer
    assert document["layers"] == [planted_layer]  # the default layer, with no --layers
    result = document["methods"]["multedit"]
    assert result["edits"] >= N_EDITS
    assert result["efficacy"]["mean"] >= 0.9
    assert result["generalization"]["mean"] >= 0.8
    assert result["specificity"]["mean"] >= 0.9
    assert result["efficacy"]["ci_low"] <= result["efficacy"]["mean"] <= result["efficacy"]["ci_high"]
    assert result["logprob_gain"]["mean"] > 0


@pytest.fixture(scope="module")
def sweep_run(planted, planted_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-sweep")
    # The planted MLP writes the fact into the last token's residual stream, so the sweep keys there
    # (as the insertion run does); `auto` ranks key positions by distinctness, not by where K writes.
    options = EditOptions(methods=["multedit"], track="insertion", key_position="last", limit=10,
                          sweep_layers=True, specificity_size=4, layers=[0], validation_size=4, neighbours=4)
    return run_editing(planted, str(planted_data_dir), out, options), out


def test_layer_sweep_peaks_at_or_next_to_the_planted_layer(sweep_run, planted):
    document, out = sweep_run
    rows = document["sweep"]["multedit"]
    assert [row["layer"] for row in rows] == list(range(planted.num_layers))
    # Any layer can be pushed to say the answer to the edited question itself;
    # generalizing to paraphrases and other views is what the storing layer buys.
    # Several layers can tie at full generalization on 10 edits (e.g. 1.0 at layers
    # 0, 2 and 3): the sweep "peaks at or next to K" when a layer within one of K
    # reaches the best value.
    general = [row["generalization"]["mean"] for row in rows]
    planted_layer = planted.model.config.planted_layer
    best = max(general)
    near = [general[layer] for layer in range(len(rows)) if abs(layer - planted_layer) <= 1]
    assert max(near) == best, general


def test_edits_are_reversible_and_never_touch_the_model_files(insertion_run):
    assert insertion_run["weights_unchanged"]
    assert insertion_run["files_unchanged"]


def test_outputs_are_complete_and_valid(insertion_run, planted):
    out, document = insertion_run["out"], insertion_run["document"]
    on_disk = json.loads((out / "editing_results.json").read_text())
    jsonschema.validate(on_disk, results_schema())
    assert on_disk["data"]["fingerprint"] == document["data"]["fingerprint"]
    lines = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    assert len(lines) == document["methods"]["multedit"]["edits"]
    first = lines[0]
    assert first["request"]["target"] and first["pre"]["question"] is not None
    # The per-edit rows average to the reported means.
    main = [l for l in lines if not l["sweep"]]
    mean = sum(l["metrics"]["efficacy"] for l in main) / len(main)
    assert mean == pytest.approx(document["methods"]["multedit"]["efficacy"]["mean"], abs=1e-6)
    # Insertion requests are questions the unedited model got wrong.
    assert not any(answer_correct(l["request"]["current"], [l["request"]["target"]]) for l in main)
    assert "| multedit |" in (out / "comparison.md").read_text()
    assert (out / "trace" / "trace_stats.json").exists()  # the default layer came from a real trace


def test_sweep_outputs(sweep_run, planted):
    document, out = sweep_run
    lines = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    assert sum(l["sweep"] for l in lines) == document["methods"]["multedit"]["edits"] * planted.num_layers
    assert (out / "efficacy_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batched_edits_and_save(planted, planted_model_dir, planted_data_dir, tmp_path):
    from harness.models.loading import load_model

    options = EditOptions(methods=["multedit"], track="insertion", limit=10, batch_edits=10, specificity_size=16,
                          layers=[planted.model.config.planted_layer], key_position="last", validation_size=4)
    saved = tmp_path / "edited-model"
    document = run_editing(planted, str(planted_data_dir), tmp_path / "run", options, save=saved)
    result = document["methods"]["multedit"]
    assert result["edits"] == 10 and result["batch_edits"] == 10
    assert result["shared_key_pairs"] == []  # one request per subject: no two keys coincide
    assert result["efficacy"]["mean"] >= 0.8
    # The saved copy carries the edits in layer K's projection and nowhere else.
    edited = load_model(saved, dtype="float32", device="cpu")
    layer = planted.model.config.planted_layer
    original_state, edited_state = planted.model.state_dict(), edited.model.state_dict()
    changed = [k for k in original_state if not original_state[k].equal(edited_state[k])]
    assert changed and all(f"layers.{layer}.mlp.down_proj" in k for k in changed)


def test_correction_track_edits_only_wrong_answers(planted, planted_data_dir, tmp_path):
    options = EditOptions(methods=["ft", "ft-l"], track="correction", limit=3, specificity_size=8,
                          layers=[planted.model.config.planted_layer], validation_size=3)
    document = run_editing(planted, str(planted_data_dir), tmp_path, options)
    assert document["data"]["config"] == "single_constraint"
    lines = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert lines and all(not answer_correct(l["request"]["current"], [l["request"]["target"]]) for l in lines)
    # Records the model already answers are counted skips, not silently dropped.
    assert document["skipped"]["records"] == document["skipped"]["reasons"].get(
        "target equals the model's current answer", 0)
    assert set(document["methods"]) == {"ft", "ft-l"}


def test_planted_control_at_k_and_above(planted, planted_data_dir, tmp_path):
    """The acceptance control on a few edits: keyed where the planted model stores its facts (the last prompt token)
    MultEdit at K inserts them without touching neighbours or the creature's other facts; one layer above K (a
    silenced MLP whose output the answer never reads) it cannot."""
    layer = planted.model.config.planted_layer
    results = {}
    for edited in (layer, layer + 1):
        options = EditOptions(methods=["multedit"], track="insertion", layers=[edited], key_position="last", limit=8,
                              specificity_size=16, neighbours=8, validation_size=4)
        results[edited] = run_editing(planted, str(planted_data_dir), tmp_path / str(edited), options)["methods"]["multedit"]
    at_k, above = results[layer], results[layer + 1]
    assert at_k["efficacy"]["mean"] >= 0.95 and at_k["efficacy_score"]["mean"] >= 0.95
    assert at_k["neighborhood"]["mean"] >= 0.9
    assert at_k["same_subject"]["mean"] >= 0.85  # 0.875 measured on these 8 edits
    assert above["efficacy"]["mean"] <= 0.1 and above["efficacy_score"]["mean"] <= 0.1

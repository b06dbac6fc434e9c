"""load_model: families, text-only LMs, safety refusals, revisions; batching invariance."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from harness.models.base import batch_offsets
from harness.models.loading import load_model, resolve_device, resolve_dtype
from harness.models.text_lm import TextLMAdapter
from vqa_constraints.errors import UserError


@pytest.fixture(scope="session")
def tiny_llava(tiny_model_dirs):
    return load_model(tiny_model_dirs("llava"), device="cpu")


def test_text_lm_loads_as_text_only_adapter(tiny_model_dirs):
    import argparse

    from harness.cli.args import add_model_arguments, load_from_args

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    adapter = load_from_args(parser.parse_args(["--model", str(tiny_model_dirs("text")), "--device", "cpu"]))
    assert isinstance(adapter, TextLMAdapter) and not adapter.is_multimodal
    assert adapter.num_layers == adapter.model.config.num_hidden_layers
    assert adapter.dtype == torch.float32 and not adapter.model.training
    question = "What is the capital of the country?"
    encoded = adapter.encode(question, answer="Paris")
    positions = encoded.positions_for_question_span(12, 19)
    assert adapter.tokenizer.decode(encoded.input_ids[0, positions]).strip() == "capital"
    assert encoded.input_ids[0, encoded.answer_positions].tolist() == adapter.answer_token_ids("Paris")
    with pytest.raises(UserError, match="text-only"):
        adapter.encode(question, image=Image.new("RGB", (8, 8)))


def test_revision_is_a_content_hash_for_local_folders(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs("text")
    first = load_model(folder, device="cpu").revision
    assert first.startswith("sha256:") and first == load_model(folder, device="cpu").revision
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert load_model(copy, device="cpu").revision != first


def test_refuses_pickle_only_folder(tiny_model_dirs, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dirs("text"), folder)
    for weights in folder.glob("*.safetensors"):
        weights.rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError) as error:
        load_model(folder, device="cpu")
    message = str(error.value)
    assert "\n" not in message and "pytorch_model.bin" in message and "safetensors" in message


def test_unsupported_architecture_names_the_class(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    with pytest.raises(UserError) as error:
        load_model(folder, device="cpu")
    assert "BertModel" in str(error.value) and "not supported" in str(error.value) and "\n" not in str(error.value)


def test_bad_paths_and_options(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="--dtype"):
        resolve_dtype("int3")
    with pytest.raises(UserError, match="--device"):
        resolve_device("tpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(32 + 8 * (i % 3), 32, 3), dtype=np.uint8)) for i in range(n)]


QUESTIONS = [
    "What is the capital of the country?",
    "Which language is spoken in the country whose flag is shown here, in Europe?",
    "Name the city.",
    "What is the colour of the creature in this image?",
] * 2


def max_batch_difference(adapter, encodeds) -> float:
    batch = adapter.collate(encodeds)
    with torch.no_grad():
        batched = adapter.model(**batch).logits
        worst = 0.0
        for row, (encoded, offset) in enumerate(zip(encodeds, batch_offsets(encodeds))):
            alone = adapter.model(**encoded.inputs).logits[0]
            worst = max(worst, (alone - batched[row, offset:]).abs().max().item())
    return worst


def test_batched_logits_equal_single_logits(tiny_llava):
    encodeds = [tiny_llava.encode(q, im, answer="Paris") for q, im in zip(QUESTIONS, images(8))]
    assert len({e.length for e in encodeds}) > 1  # real padding happens
    assert max_batch_difference(tiny_llava, encodeds) < 1e-4
    text = tiny_llava.text_only()
    assert max_batch_difference(text, [text.encode(q) for q in QUESTIONS]) < 1e-4


def test_batched_generation_matches_single(tiny_llava):
    encodeds = [tiny_llava.encode(q, im) for q, im in zip(QUESTIONS[:4], images(4))]
    batch = tiny_llava.collate(encodeds)
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=tiny_llava.pad_token_id)
    together = tiny_llava.model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    for row, encoded in enumerate(encodeds):
        alone = tiny_llava.model.generate(**encoded.inputs, **settings)[0, encoded.length :]
        assert alone.tolist() == together[row].tolist()


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_logits_equal_single_logits_other_families(tiny_model_dirs, family, padding_side):
    adapter = load_model(tiny_model_dirs(family), device="cpu")
    encodeds = [adapter.encode(q, im, answer="Paris") for q, im in zip(QUESTIONS[:4], images(4))]
    batch = adapter.collate(encodeds, padding_side=padding_side)
    offsets = batch_offsets(encodeds, padding_side)
    with torch.no_grad():
        batched = adapter.model(**batch).logits
        for row, (encoded, offset) in enumerate(zip(encodeds, offsets)):
            alone = adapter.model(**encoded.inputs).logits[0]
            assert (alone - batched[row, offset : offset + encoded.length]).abs().max().item() < 1e-4


def test_hub_id_resolves_from_the_local_cache_with_its_commit(tiny_model_dirs, tmp_path, monkeypatch):
    """A Hub id loads offline from a Hub-layout cache, and its revision is the snapshot's commit hash."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--text-lm"
    shutil.copytree(tiny_model_dirs("text"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_model(repo / "snapshots" / commit, device="cpu").revision == commit
    adapter = load_model("tiny/text-lm", device="cpu")
    assert adapter.revision == commit and adapter.name_or_path == "tiny/text-lm"


def test_remote_code_is_refused_without_the_flag(tiny_model_dirs, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dirs("text"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "my-custom-lm"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trust-remote-code"):
        load_model(folder, device="cpu")


def test_text_lm_chat_template_prompt_and_answer_without_space(tmp_path):
    from harness.models.tiny import build_tiny

    adapter = load_model(build_tiny("text", tmp_path / "chat", chat_template=True), device="cpu")
    question = "What is the capital of France?"
    prompt, start = adapter.build_prompt(question)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert prompt[start : start + len(question)] == question
    encoded = adapter.encode(question, answer="Paris")
    assert encoded.text == prompt + "Paris"  # no space after the template's newline
    assert adapter.tokenizer.decode(encoded.input_ids[0, encoded.answer_positions]) == "Paris"
    positions = encoded.positions_for_question_span(question.index("France"), question.index("?"))
    assert adapter.tokenizer.decode(encoded.input_ids[0, positions]).strip() == "France"

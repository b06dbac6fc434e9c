"""docs/extending.md's four examples, run as written: each registers a throwaway entry in one registry, and the
commands then use it end to end on tiny models and data. The registries are put back after each test."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from editing import methods
from harness.models import registry
from harness.tracing import corruptions
from vqa_constraints import sources
from vqa_constraints.cli import run

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
COMMON = ["--dtype", "float32", "--device", "cpu"]


def examples() -> dict[str, list[str]]:
    """Section title -> the fenced code blocks under it, in order, with their language."""
    found: dict[str, list[str]] = {}
    section = None
    for block in re.split(r"^(## .+)$", DOC.read_text(encoding="utf-8"), flags=re.M):
        if block.startswith("## "):
            section = block[3:].strip()
            continue
        if section:
            found[section] = re.findall(r"^```(\w+)\n(.*?)^```", block, flags=re.M | re.S)
    return found


def run_example(title: str, monkeypatch) -> dict:
    """Import the section's Python block as a module of its own (removed again after the test); its namespace."""
    [code] = [text for language, text in examples()[title] if language == "python"]
    assert len(code.splitlines()) < 30, f"{title}: the example should stay under 30 lines"
    module = types.ModuleType(f"extending_example_{title.lower().replace(' ', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(code, f"{DOC} ({title})", "exec", dont_inherit=True), module.__dict__)
    return module.__dict__


@pytest.fixture(autouse=True)
def registries():
    """Each test's registrations are undone afterwards, so no other test sees the throwaway entries."""
    tables = [registry.MULTIMODAL, registry.MODEL_TYPES, corruptions.CORRUPTIONS, sources.SOURCES, methods.METHODS]
    saved = [dict(table) for table in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


def tiny_vipllava(out: Path) -> Path:
    """A tiny random ViP-LLaVA: the tiny LLaVA's tokenizer, processor and shapes, in VipLlava's classes."""
    from transformers import (
        CLIPVisionConfig, LlamaConfig, LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration,
    )

    from harness.models import tiny

    tokenizer = tiny.sentencepiece_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=tiny._clip_image_processor(), tokenizer=tokenizer, patch_size=tiny.PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=tiny.LLAVA_CHAT_TEMPLATE,
    )
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**tiny._vision_kwargs()).to_dict(),
        text_config=LlamaConfig(**tiny._text_config_kwargs(len(tokenizer))).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layers=[-2, -1],
    )
    tiny._save(VipLlavaForConditionalGeneration(config), processor, out)
    return out


def test_a_model_family(planted_data_dir, tmp_path, monkeypatch):
    namespace = run_example("A model family", monkeypatch)
    assert registry.MULTIMODAL["VipLlavaForConditionalGeneration"] is namespace["VipLlavaAdapter"]
    model = tiny_vipllava(tmp_path / "vipllava")
    out = tmp_path / "eval"
    assert run(["evaluate", "--model", str(model), "--data", str(planted_data_dir), "--config", "single_constraint",
                "--limit", "2", "--out", str(out), "--no-progress", *COMMON]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["family"] == "vipllava"
    trace = tmp_path / "trace"
    assert run(["trace", "--model", str(model), "--data", str(planted_data_dir), "--config", "single_constraint",
                "--corruption", "image-noise", "--traced", "all", "--limit", "2", "--kinds", "mlp",
                "--out", str(trace), "--no-progress", *COMMON]) == 0
    assert json.loads((trace / "trace_stats.json").read_text())["model"]["family"] == "vipllava"


def test_a_corruption(tiny_model_dirs, planted_data_dir, tmp_path, monkeypatch):
    run_example("A corruption", monkeypatch)
    out = tmp_path / "trace"
    assert run(["trace", "--model", str(tiny_model_dirs("llava")), "--data", str(planted_data_dir), "--config",
                "single_constraint", "--corruption", "zero", "--traced", "all", "--limit", "2", "--kinds", "mlp,attn",
                "--out", str(out), "--no-progress", *COMMON]) == 0
    document = json.loads((out / "trace_stats.json").read_text())  # written only after the schema accepted it
    assert document["options"]["corruption"] == "zero"
    assert document["counts"]["traced"] == 2


def test_a_dataset_source(tiny_model_dirs, tmp_path, monkeypatch):
    run_example("A dataset source", monkeypatch)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}
    lines = []
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
        lines.append(json.dumps({"image": f"{name}.png", "subject": f"{name} square", "relation": "colour",
                                 "question": "What colour is the square in this image?",
                                 "phrase": "the square in this image", "answers": [name], "license": "CC0-1.0"}))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = tmp_path / "build"
    assert run(["build", "--sources", "colours", "--source-path", f"colours={questions}", "--out", str(data)]) == 0
    assert run(["validate", str(data)]) == 0
    out = tmp_path / "eval"
    assert run(["evaluate", "--model", str(tiny_model_dirs("llava")), "--data", str(data), "--out", str(out),
                "--no-progress", *COMMON]) == 0
    assert json.loads((out / "results.json").read_text())["n"] == len(colours)


def test_an_edit_method(tiny_model_dirs, planted_data_dir, tmp_path, monkeypatch):
    run_example("An edit method", monkeypatch)
    [config] = [text for language, text in examples()["An edit method"] if language == "yaml"]
    method_config = tmp_path / "scale.yaml"
    method_config.write_text(config, encoding="utf-8")
    out = tmp_path / "edit"
    assert run(["edit", "--model", str(tiny_model_dirs("llava")), "--data", str(planted_data_dir), "--method",
                "scale-down,multedit", "--method-config", str(method_config), "--track", "insertion",
                "--layers", "1", "--limit", "2", "--specificity-size", "4", "--sweep-layers", "0",
                "--validation-size", "2", "--neighbours", "2", "--corpus-keys", "256", "--out", str(out), *COMMON]) == 0
    document = json.loads((out / "editing_results.json").read_text())
    assert set(document["methods"]) == {"scale-down", "multedit"}
    assert document["methods"]["scale-down"]["config"]["factor"] == 0.5  # the runner checked every restore bit for bit

"""Loading for real sizes: --device-map auto (accelerate), the Qwen2-VL pixel budget, one dtype resolver."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from harness.cli.args import add_model_arguments, load_from_args
from harness.models.loading import (
    DEFAULT_MAX_PIXELS, cap_image_pixels, load_model, resolve_dtype,
)
from harness.vllm_backend import engine_kwargs, vllm_dtype
from vqa_constraints.cli import run
from vqa_constraints.errors import UserError


def test_device_map_auto_loads_and_evaluates_on_cpu(tiny_model_dirs, planted_data_dir, tmp_path):
    model = tiny_model_dirs("llava")
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    adapter = load_from_args(parser.parse_args(["--model", str(model), "--device-map", "auto"]))
    assert adapter.device_map == "auto" and adapter.device.type == "cpu" and adapter.dtype == torch.float32
    # accelerate placed the weights (its device map is recorded on the model)
    assert set(getattr(adapter.model, "hf_device_map", {"": "cpu"}).values()) <= {"cpu", torch.device("cpu")}
    out = tmp_path / "run"
    assert run(["evaluate", "--model", str(model), "--data", str(planted_data_dir), "--config", "single_constraint",
                "--limit", "2", "--out", str(out), "--device-map", "auto", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 2 and results["model"]["device_map"] == "auto" and results["model"]["dtype"] == "float32"
    # the same numbers as a plain single-device load
    assert run(["evaluate", "--model", str(model), "--data", str(planted_data_dir), "--config", "single_constraint",
                "--limit", "2", "--out", str(tmp_path / "plain"), "--device", "cpu", "--no-progress"]) == 0
    assert (out / "samples.jsonl").read_bytes() == (tmp_path / "plain" / "samples.jsonl").read_bytes()


def test_device_map_must_be_a_known_strategy(tiny_model_dirs):
    with pytest.raises(UserError, match="--device-map"):
        load_model(tiny_model_dirs("text"), device_map="everywhere")


def test_qwen2_vl_image_budget_is_capped(tiny_model_dirs):
    folder = tiny_model_dirs("qwen2_vl")
    big = Image.new("RGB", (96, 96), (10, 120, 200))
    default = load_model(folder, device="cpu")
    assert default.max_pixels == min(DEFAULT_MAX_PIXELS, 64 * 64)  # the tiny checkpoint's own budget is smaller
    capped = load_model(folder, device="cpu", max_pixels=32 * 32)
    assert capped.max_pixels == 32 * 32
    many = len(default.encode("What is this?", big).image_positions)
    few = len(capped.encode("What is this?", big).image_positions)
    # 4x4 patches merged 2x2: one token per 8x8 pixels, so at most 1024 / 64 = 16 tokens under the cap
    assert few <= 32 * 32 // 64 < many
    with pytest.raises(UserError, match="--max-pixels"):
        load_model(folder, device="cpu", max_pixels=10)  # below the processor's minimum
    # fixed-size processors are left alone
    assert cap_image_pixels(load_model(tiny_model_dirs("llava"), device="cpu").processor, 16) is None


def test_dtype_means_the_same_for_vllm_and_hf():
    cuda = torch.device("cuda")
    for flag in ("auto", "bf16", "bfloat16", "fp16", "float32"):
        assert vllm_dtype(flag) == str(resolve_dtype(flag, cuda)).replace("torch.", "")
    assert vllm_dtype("auto") == "bfloat16" and vllm_dtype("bf16") == "bfloat16"
    with pytest.raises(UserError, match="--dtype"):
        vllm_dtype("int3")
    options = argparse.Namespace(model="m", revision=None, dtype="auto", trust_remote_code=False, seed=3,
                                 tensor_parallel_size=4)
    from harness.evaluate import EvalOptions, dtype_used

    # what results.json records for a vLLM run: the dtype vLLM was given, not the flag's "auto"
    assert dtype_used(EvalOptions(model="m", data="d", out="o", backend="vllm"), adapter=None) == "bfloat16"
    kwargs = engine_kwargs(options, max_pixels=1024)
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["dtype"] == "bfloat16"
    assert kwargs["generation_config"] == "vllm" and kwargs["mm_processor_kwargs"] == {"max_pixels": 1024}

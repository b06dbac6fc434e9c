"""The vLLM back-end's request building and output reading (vLLM itself is not installed in CI)."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
from harness_support import planted_adapter, planted_records, run_options  # noqa: F401  (session fixtures)

from harness.scoring import Prompt
from harness.vllm_backend import VLLMBackend, build_requests, prompt_builder, read_outputs, sampling_kwargs
from vqa_constraints.errors import UserError


def test_prompts_match_the_transformers_backend(planted_adapter, planted_records, planted_model_dir, planted_data_dir, tmp_path):
    render = prompt_builder(run_options(planted_model_dir, planted_data_dir, tmp_path))
    prompts = [Prompt(r.question, r.image) for r in planted_records[:3]]
    requests = build_requests(prompts, render)
    for request, record in zip(requests, planted_records):
        assert request["prompt"] == planted_adapter.build_prompt(record.question, with_image=True)[0]
        assert request["multi_modal_data"]["image"].size == record.image.size
    assert "multi_modal_data" not in build_requests([Prompt("text only?")], render)[0]


def test_sampling_is_greedy_with_first_token_logprobs():
    kwargs = sampling_kwargs(12, seed=3)
    assert kwargs["temperature"] == 0.0 and kwargs["max_tokens"] == 12 and kwargs["logprobs"] == 1 and kwargs["seed"] == 3


def test_outputs_become_generations():
    # The shape of vLLM's RequestOutput: outputs[0].text / token_ids / logprobs[step][token_id].logprob
    completion = SimpleNamespace(text=" Paris\nUSER: more", token_ids=[7, 9], logprobs=[{7: SimpleNamespace(logprob=-0.25)}, {9: SimpleNamespace(logprob=-1.0)}])
    empty = SimpleNamespace(text="", token_ids=[], logprobs=None)
    generations = read_outputs([SimpleNamespace(outputs=[completion]), SimpleNamespace(outputs=[empty])])
    assert generations[0].text == "Paris"
    assert generations[0].confidence == pytest.approx(math.exp(-0.25))
    assert generations[1].text == "" and generations[1].confidence == 0.0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error(planted_model_dir, planted_data_dir, tmp_path):
    options = run_options(planted_model_dir, planted_data_dir, tmp_path, backend="vllm", scoring="generate")
    with pytest.raises(UserError, match="vLLM is not installed"):
        VLLMBackend.from_options(options)

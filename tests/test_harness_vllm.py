"""The vLLM back-end's request building and output reading (vLLM itself is not installed in CI).

Log-prob scoring is checked against the transformers back-end by feeding the HF model's own prompt
log-probs, shaped like vLLM's ``RequestOutput.prompt_logprobs``, through the vLLM output reader: the
two must agree within 1e-5 nats per answer (the tolerance stated in docs/models.md).
"""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
from harness_support import planted_adapter, planted_records, run_options  # noqa: F401  (session fixtures)

import torch

from harness import scoring
from harness.models.encoding import tokenize_with_spans
from harness.scoring import LoglikelihoodRequest, Prompt
from harness.vllm_backend import (
    VLLMBackend, build_loglikelihood_requests, build_requests, greedy_sampling_kwargs, prompt_builder,
    read_loglikelihoods, read_outputs, request_text, sampling_kwargs, scoring_sampling_kwargs,
)
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


def test_greedy_sampling_equals_the_hf_greedy_config():
    params = greedy_sampling_kwargs(9, seed=0, stop_token_ids=[2, 5])
    config = scoring.greedy_config(9, pad_token_id=0, eos_token_ids=[2, 5])
    assert params["temperature"] == 0.0 and config.do_sample is False  # greedy in both
    assert params["max_tokens"] == config.max_new_tokens and params["min_tokens"] == config.min_new_tokens == 0
    assert params["repetition_penalty"] == config.repetition_penalty == 1.0
    assert params["presence_penalty"] == params["frequency_penalty"] == 0.0 and params["top_p"] == 1.0
    assert params["stop_token_ids"] == config.eos_token_id == [2, 5]
    scoring_params = scoring_sampling_kwargs()
    assert scoring_params["prompt_logprobs"] == 1 and scoring_params["max_tokens"] == 1


@pytest.fixture(scope="module")
def tiny_llava(tiny_model_dirs):
    from harness.models.loading import load_model

    folder = tiny_model_dirs("llava")
    options = SimpleNamespace(model=str(folder), revision=None, trust_remote_code=False, max_pixels=None)
    return load_model(folder, device="cpu"), prompt_builder(options)


def _requests() -> list[LoglikelihoodRequest]:
    from PIL import Image

    questions = ["What is the capital of the country whose flag is in this image?",
                 "Which language is spoken in the country whose flag is shown here?"]
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 24), (30, 30, 200))]
    return [LoglikelihoodRequest(Prompt(q, im), answer)
            for q, im in zip(questions, images) for answer in ("Paris", "Tokyo capital", "the capital of France")]


def test_requests_never_double_the_bos(tiny_llava):
    adapter, render = tiny_llava
    tokenizer = adapter.tokenizer
    text = render("What is this?")
    for rendered in (text, tokenizer.bos_token + text):
        sent = request_text(tokenizer, rendered)
        # what vLLM will tokenize (special tokens added) is exactly what the HF back-end feeds the model
        assert tokenizer(sent)["input_ids"] == tokenize_with_spans(tokenizer, rendered)[0]
    assert tokenizer(request_text(tokenizer, tokenizer.bos_token + text))["input_ids"].count(tokenizer.bos_token_id) == 1


def _vllm_like_output(adapter, request: LoglikelihoodRequest):
    """A RequestOutput-shaped object holding the HF model's prompt log-probs (token itself + top-1)."""
    encoded = adapter.encode(request.prompt.question, request.prompt.image, answer=request.continuation)
    with torch.no_grad():
        log_probs = torch.log_softmax(adapter.model(**encoded.inputs).logits[0].float(), dim=-1)
    ids = encoded.input_ids[0].tolist()
    steps = [None]
    for position in range(1, len(ids)):
        row = log_probs[position - 1]
        top = int(row.argmax())
        steps.append({ids[position]: SimpleNamespace(logprob=float(row[ids[position]])),
                      top: SimpleNamespace(logprob=float(row[top]))})
    return SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=steps, outputs=[])


def test_prompt_logprob_scoring_equals_the_hf_backend(tiny_llava):
    adapter, render = tiny_llava
    requests = _requests()
    dicts, spans = build_loglikelihood_requests(requests, render, adapter.tokenizer)
    for request, sent, span in zip(requests, dicts, spans):
        encoded = adapter.encode(request.prompt.question, request.prompt.image, answer=request.continuation)
        assert list(span.token_ids) == encoded.input_ids[0, encoded.answer_positions].tolist()
        assert span.trailing == encoded.length - 1 - encoded.answer_positions[-1]
        assert sent["multi_modal_data"]["image"].size == request.prompt.image.size
    assert max(len(span.token_ids) for span in spans) > 1  # multi-token answers
    hf = scoring.HFBackend(adapter).loglikelihood(requests, batch_size=4)
    read = read_loglikelihoods([_vllm_like_output(adapter, r) for r in requests], spans)
    for a, b in zip(hf, read):
        assert b.num_tokens == a.num_tokens
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert b.confidence == pytest.approx(a.confidence, abs=1e-5)


def test_reader_refuses_outputs_that_do_not_end_with_the_answer(tiny_llava):
    adapter, render = tiny_llava
    request = _requests()[0]
    _, spans = build_loglikelihood_requests([request], render, adapter.tokenizer)
    output = _vllm_like_output(adapter, request)
    output.prompt_token_ids = output.prompt_token_ids[:-1] + [output.prompt_token_ids[-1] + 1]
    with pytest.raises(UserError, match="does not end with the answer tokens"):
        read_loglikelihoods([output], spans)

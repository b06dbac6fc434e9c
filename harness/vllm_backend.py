"""The vLLM back-end: generation and log-prob scoring with vLLM's offline ``LLM.generate``
(optional extra: ``pip install 'vqa-constraints[vllm]'``, CUDA only).

Prompts are rendered by the same adapter code as the transformers back-end
(processor + chat template or the documented fallback), decoding is the same
greedy configuration (``greedy_sampling_kwargs`` mirrors ``scoring.greedy_config``),
and ``--dtype`` goes through the same resolver (``auto`` is bfloat16 on CUDA in
both). Log-prob scoring sends prompt + answer and reads vLLM's prompt
log-probs at the answer tokens, counted from the end of the prompt (vLLM
expands image placeholders itself, so only the tail of its token ids lines up
with ours, and ``read_loglikelihoods`` checks that it does).

vLLM is imported only when this back-end runs; request building and output
reading are plain functions, tested without vLLM installed. This module is not
exercised against a real vLLM in CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import AutoConfig, GenerationConfig

from harness.models import registry
from harness.models.encoding import adds_special_tokens, positions_overlapping, tokenize_with_spans
from harness.models.loading import _load_processor, cap_image_pixels, resolve_dtype
from harness.models.prompting import answer_separator
from harness.scoring import Generation, Loglikelihood, LoglikelihoodRequest, Prompt, clean_generation, stop_token_ids
from vqa_constraints.errors import UserError


@dataclass(frozen=True)
class AnswerSpan:
    """Where a scored continuation sits in a request: its token ids and how many tokens follow it (EOS...)."""

    token_ids: tuple[int, ...]
    trailing: int


def vllm_dtype(dtype: str) -> str:
    """``--dtype`` for vLLM through the transformers back-end's resolver (vLLM always runs on CUDA)."""


    return str(resolve_dtype(dtype, torch.device("cuda"))).replace("torch.", "")


def engine_kwargs(options, max_pixels: int | None = None) -> dict:
    """Arguments for ``vllm.LLM``: the model, the resolved dtype, tensor parallelism, no checkpoint defaults."""
    kwargs = {
        "model": options.model,
        "revision": options.revision,
        "dtype": vllm_dtype(options.dtype),
        "trust_remote_code": options.trust_remote_code,
        "seed": options.seed,
        "tensor_parallel_size": options.tensor_parallel_size,
        # "vllm": ignore the checkpoint's generation_config.json, as the HF back-end does.
        "generation_config": "vllm",
        "limit_mm_per_prompt": {"image": 1},
    }
    if max_pixels is not None:
        kwargs["mm_processor_kwargs"] = {"max_pixels": max_pixels}
    return kwargs


def request_text(tokenizer, text: str) -> str:
    """The prompt string to hand vLLM, which tokenizes it with special tokens added.

    When a chat template already wrote the BOS, it is dropped here so vLLM adds it once (no double BOS).
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos and not adds_special_tokens(tokenizer, text) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text


def build_requests(prompts: Sequence[Prompt], prompt_text: Callable[[str], str], tokenizer=None) -> list[dict]:
    """vLLM multi-modal prompt dicts: the rendered prompt text plus the PIL image."""
    requests = []
    for prompt in prompts:
        text = prompt_text(prompt.question)
        request = {"prompt": request_text(tokenizer, text) if tokenizer is not None else text}
        if prompt.image is not None:
            request["multi_modal_data"] = {"image": prompt.image.convert("RGB")}
        requests.append(request)
    return requests


def build_loglikelihood_requests(
    requests: Sequence[LoglikelihoodRequest], prompt_text: Callable[[str], str], tokenizer
) -> tuple[list[dict], list[AnswerSpan]]:
    """One vLLM prompt per request (prompt, separator, continuation) and where its answer tokens are.

    The answer tokens are found exactly as the transformers back-end finds them (character offsets of the
    continuation in the tokenized text), so both back-ends score the same tokens.
    """
    dicts, spans = [], []
    for request in requests:
        prompt = prompt_text(request.prompt.question)
        start = len(prompt) + len(answer_separator(prompt))
        text = prompt + answer_separator(prompt) + request.continuation
        ids, char_spans = tokenize_with_spans(tokenizer, text)
        positions = positions_overlapping(char_spans, start, len(text))
        if not positions:
            raise ValueError(f"continuation {request.continuation!r} maps to no token")
        spans.append(AnswerSpan(tuple(ids[positions[0] : positions[-1] + 1]), len(ids) - 1 - positions[-1]))
        dicts.append(build_requests([Prompt(text, request.prompt.image)], lambda q: q, tokenizer)[0])
    return dicts, spans


def greedy_sampling_kwargs(max_new_tokens: int, seed: int = 0, stop_token_ids: Sequence[int] = ()) -> dict:
    """``SamplingParams`` fields equal to ``scoring.greedy_config``: greedy, no penalties, first-token log-prob."""
    return {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_tokens": 0,
        "max_tokens": max_new_tokens,
        "stop_token_ids": list(stop_token_ids),
        "logprobs": 1,
        "seed": seed,
    }


sampling_kwargs = greedy_sampling_kwargs  # the name older callers use


def scoring_sampling_kwargs(seed: int = 0) -> dict:
    """Prompt log-probs (the token itself plus the top one, for confidence) and a single throwaway step."""
    return dict(greedy_sampling_kwargs(1, seed), logprobs=None, prompt_logprobs=1)


def _logprob(entry) -> float:
    return float(getattr(entry, "logprob", entry))


def read_outputs(outputs) -> list[Generation]:
    """``RequestOutput``s -> ``Generation``s (text, probability of the first generated token)."""
    generations = []
    for output in outputs:
        completion = output.outputs[0]
        confidence = 0.0
        if completion.token_ids and completion.logprobs:
            confidence = math.exp(_logprob(completion.logprobs[0][completion.token_ids[0]]))
        generations.append(Generation(clean_generation(completion.text), confidence))
    return generations


def read_loglikelihoods(outputs, spans: Sequence[AnswerSpan]) -> list[Loglikelihood]:
    """``RequestOutput``s with ``prompt_logprobs`` -> summed answer log-probs, as ``HFBackend.loglikelihood``.

    ``prompt_logprobs[i]`` maps token ids to the log-prob of the token at prompt position ``i`` (entry 0 is
    None); it always holds the prompt's own token, and with ``prompt_logprobs=1`` the most likely one too.
    """
    results = []
    for number, (output, span) in enumerate(zip(outputs, spans)):
        ids = list(output.prompt_token_ids)
        end = len(ids) - span.trailing
        start = end - len(span.token_ids)
        if start < 1 or tuple(ids[start:end]) != span.token_ids:
            raise UserError(
                f"vLLM request {number}: its prompt does not end with the answer tokens the harness tokenized "
                f"({list(span.token_ids)} vs {ids[max(start, 0):end]}); the two tokenizations disagree"
            )
        steps = output.prompt_logprobs
        total = sum(_logprob(steps[q][ids[q]]) for q in range(start, end))
        confidence = math.exp(max(_logprob(entry) for entry in steps[start].values()))
        results.append(Loglikelihood(float(total), end - start, confidence))
    return results


class VLLMBackend:
    name = "vllm"

    def __init__(self, llm, prompt_text: Callable[[str], str], max_new_tokens: int, seed: int = 0,
                 tokenizer=None, stop_token_ids: Sequence[int] = (), dtype: str | None = None):
        self.llm = llm
        self._prompt_text = prompt_text
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.dtype = dtype

    @classmethod
    def from_options(cls, options) -> "VLLMBackend":
        try:
            import vllm  # optional extra (CUDA only): imported only when the vllm back-end is chosen
        except ImportError:
            raise UserError(
                "--backend vllm: vLLM is not installed (pip install 'vqa-constraints[vllm]' on a CUDA machine)"
            ) from None
        adapter = weightless_adapter(options)
        llm = vllm.LLM(**engine_kwargs(options, adapter.max_pixels))
        return cls(llm, _renderer(adapter), options.max_new_tokens, options.seed, adapter.tokenizer,
                   checkpoint_stop_ids(options, adapter.tokenizer), vllm_dtype(options.dtype))

    def prompt_text(self, prompt: Prompt) -> str:
        return self._prompt_text(prompt.question)

    def _run(self, requests: list[dict], **kwargs):
        from vllm import SamplingParams  # optional extra, present once from_options has built the engine

        return self.llm.generate(requests, SamplingParams(**kwargs), use_tqdm=False)

    def generate(self, prompts: Sequence[Prompt], batch_size: int = 0) -> list[Generation]:
        # vLLM schedules its own batches; batch_size is ignored (results do not depend on it).
        kwargs = greedy_sampling_kwargs(self.max_new_tokens, self.seed, self.stop_token_ids)
        return read_outputs(self._run(build_requests(prompts, self._prompt_text, self.tokenizer), **kwargs))

    def next_token_confidence(self, prompts: Sequence[Prompt], batch_size: int = 0) -> list[float]:
        kwargs = greedy_sampling_kwargs(1, self.seed, self.stop_token_ids)
        outputs = self._run(build_requests(prompts, self._prompt_text, self.tokenizer), **kwargs)
        return [g.confidence for g in read_outputs(outputs)]

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], batch_size: int = 0) -> list[Loglikelihood]:
        dicts, spans = build_loglikelihood_requests(requests, self._prompt_text, self.tokenizer)
        return read_loglikelihoods(self._run(dicts, **scoring_sampling_kwargs(self.seed)), spans)


def weightless_adapter(options):
    """The checkpoint's adapter with its processor (image budget capped) but no weights: prompts only."""


    common = {"revision": options.revision, "trust_remote_code": options.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(options.model, **common)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {options.model}: cannot read its config: {' '.join(str(exc).split())[:300]}") from None
    adapter_class, _ = registry.resolve(config, options.model)
    if not adapter_class.is_multimodal:
        raise UserError(f"--model {options.model}: a text-only model; VQA-Constraints needs a model that takes images")
    processor, tokenizer = _load_processor(options.model, adapter_class, common)
    adapter = adapter_class(None, processor, tokenizer, options.model, options.revision)
    adapter.max_pixels = cap_image_pixels(processor, getattr(options, "max_pixels", None))
    return adapter


def _renderer(adapter) -> Callable[[str], str]:
    return lambda question: adapter.build_prompt(question, with_image=True)[0]


def prompt_builder(options) -> Callable[[str], str]:
    """The adapter's own prompt rendering (processor + chat template), without loading the weights."""
    return _renderer(weightless_adapter(options))


def checkpoint_stop_ids(options, tokenizer) -> list[int]:
    """The stop ids the HF back-end uses: the tokenizer's EOS plus the checkpoint's listed ones."""


    try:
        config = GenerationConfig.from_pretrained(options.model, revision=options.revision)
    except (OSError, ValueError):
        config = None
    return stop_token_ids(tokenizer, config)

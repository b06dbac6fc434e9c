"""Generation with vLLM's offline ``LLM.generate`` (optional extra: ``pip install 'vqa-constraints[vllm]'``).

Only generation requests are answered here; prompts are built by the same
adapter code as the transformers back-end (processor + chat template or the
documented fallback), so both back-ends see identical prompt text. vLLM is
imported only when this back-end runs; the request building and output
reading below are plain functions, tested without vLLM installed. This module
is not exercised against a real vLLM in CI.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from vqa_constraints.errors import UserError

from harness.scoring import Generation, LoglikelihoodRequest, Prompt, clean_generation


def build_requests(prompts: Sequence[Prompt], prompt_text: Callable[[str], str]) -> list[dict]:
    """vLLM multi-modal prompt dicts: the rendered prompt text plus the PIL image."""
    requests = []
    for prompt in prompts:
        request = {"prompt": prompt_text(prompt.question)}
        if prompt.image is not None:
            request["multi_modal_data"] = {"image": prompt.image.convert("RGB")}
        requests.append(request)
    return requests


def sampling_kwargs(max_new_tokens: int, seed: int = 0) -> dict:
    """Greedy decoding, and the log-prob of the chosen token at each step (for confidence)."""
    return {"temperature": 0.0, "max_tokens": max_new_tokens, "logprobs": 1, "seed": seed}


def read_outputs(outputs) -> list[Generation]:
    """``RequestOutput``s -> ``Generation``s (text, probability of the first generated token)."""
    generations = []
    for output in outputs:
        completion = output.outputs[0]
        confidence = 0.0
        if completion.token_ids and completion.logprobs:
            first = completion.logprobs[0][completion.token_ids[0]]
            confidence = math.exp(getattr(first, "logprob", first))
        generations.append(Generation(clean_generation(completion.text), confidence))
    return generations


class VLLMBackend:
    name = "vllm"

    def __init__(self, llm, prompt_text: Callable[[str], str], max_new_tokens: int, seed: int = 0):
        self.llm = llm
        self._prompt_text = prompt_text
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    @classmethod
    def from_options(cls, options) -> "VLLMBackend":
        try:
            import vllm
        except ImportError:
            raise UserError(
                "--backend vllm: vLLM is not installed (pip install 'vqa-constraints[vllm]' on a CUDA machine)"
            ) from None
        llm = vllm.LLM(
            model=options.model,
            revision=options.revision,
            dtype="auto" if options.dtype == "auto" else options.dtype,
            trust_remote_code=options.trust_remote_code,
            seed=options.seed,
        )
        return cls(llm, prompt_builder(options), options.max_new_tokens, options.seed)

    def prompt_text(self, prompt: Prompt) -> str:
        return self._prompt_text(prompt.question)

    def generate(self, prompts: Sequence[Prompt], batch_size: int = 0) -> list[Generation]:
        # vLLM schedules its own batches; batch_size is ignored (results do not depend on it).
        from vllm import SamplingParams

        params = SamplingParams(**sampling_kwargs(self.max_new_tokens, self.seed))
        outputs = self.llm.generate(build_requests(prompts, self._prompt_text), params, use_tqdm=False)
        return read_outputs(outputs)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], batch_size: int = 0):
        raise UserError("--backend vllm answers generation only; use --backend hf for --scoring logprob or both")


def prompt_builder(options) -> Callable[[str], str]:
    """The adapter's own prompt rendering (processor + chat template), without loading the weights."""
    from transformers import AutoConfig, AutoProcessor

    from harness.models import registry

    common = {"revision": options.revision, "trust_remote_code": options.trust_remote_code}
    config = AutoConfig.from_pretrained(options.model, **common)
    adapter_class, _ = registry.resolve(config, options.model)
    processor = AutoProcessor.from_pretrained(options.model, **common)
    adapter = adapter_class(None, processor, getattr(processor, "tokenizer", processor), options.model, options.revision)
    if not adapter.is_multimodal:
        raise UserError(f"--model {options.model}: a text-only model; VQA-Constraints needs a model that takes images")
    return lambda question: adapter.build_prompt(question, with_image=True)[0]

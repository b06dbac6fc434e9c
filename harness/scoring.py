"""Answer matching and the two things a model is asked: generate, and score a continuation.

A request is a small typed object (``Prompt`` for generation, ``LoglikelihoodRequest``
for teacher-forced scoring); a back-end answers lists of them. ``HFBackend``
runs any ``ModelAdapter`` with transformers; ``harness.vllm_backend`` answers
generation requests with vLLM. Results never depend on the batch size: each
row is padded (left for generation, right for scoring) and masked, so a row
sees exactly the tokens it would see alone.

Decoding is one explicit greedy configuration (``greedy_config``), never the
checkpoint's ``generation_config.json`` (whose repetition penalty or sampling
settings would otherwise leak in). Scoring computes the LM head only at the
positions it reads (``logits_to_keep``), never ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import re
import string
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from transformers import GenerationConfig

from vqa_constraints.records import Record

DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_BATCH_SIZE = 8

# --- answer matching ----------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, delete punctuation ("U.S.A." -> "usa"), drop a/an/the, collapse whitespace (SQuAD-style)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_correct(prediction: str, answers: Iterable[str]) -> bool:
    """True when some gold answer, normalised, occurs in the normalised prediction as whole words.

    The prompt asks for an answer "in a few words", so "It is Paris." counts for "Paris".
    """
    padded = f" {normalize_answer(prediction)} "
    for answer in answers:
        gold = normalize_answer(answer)
        if gold and f" {gold} " in padded and _leading_mark_kept(prediction, answer):
            return True
    return False


def _leading_mark_kept(prediction: str, answer: str) -> bool:
    """A gold answer that starts with a mark (".ki", "+686") needs that mark in the prediction: normalising drops
    punctuation, and the bare word ("ki") is another answer."""
    head = re.match(r"\s*([^\w\s]+\w+)", answer)
    if head is None:
        return True
    return re.search(r"(?<![\w])" + re.escape(head.group(1).lower()) + r"(?!\w)", prediction.lower()) is not None


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    """True when the normalised prediction equals some normalised gold answer."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in answers)


# --- requests and responses ---------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One question to put to a model; ``image=None`` asks it text-only."""

    question: str
    image: object = None  # PIL image or None


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` (teacher forced) after ``prompt``."""

    prompt: Prompt
    continuation: str


@dataclass(frozen=True)
class Generation:
    text: str  # the decoded answer, cut at the first newline, stripped
    confidence: float  # probability of the first generated token


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # summed log-probability of the continuation's tokens
    num_tokens: int
    confidence: float  # max next-token probability right after the prompt (= greedy first-token probability)


def as_prompt(item, adapter) -> Prompt:
    """A ``Prompt`` from a Prompt or a Record; a text-only adapter gets the record's text-only question."""
    if isinstance(item, Prompt):
        return item
    if isinstance(item, Record):
        if not getattr(adapter, "is_multimodal", True):
            return Prompt(item.text_only_question or item.question, None)
        return Prompt(item.question, item.image)
    raise TypeError(f"expected a Prompt or Record, got {type(item).__name__}")


def _batches(items: Sequence, size: int):
    if size < 1:
        raise ValueError("batch size must be at least 1")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _collate(adapter, encodeds, padding_side: str) -> dict:
    """The adapter's batch, with floating inputs (pixels) in the model's dtype."""
    batch = adapter.collate(encodeds, padding_side=padding_side)
    return {
        key: value.to(adapter.dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in batch.items()
    }


def _encode(adapter, prompt: Prompt, answer: str | None = None):
    return adapter.encode(prompt.question, prompt.image, answer=answer)


def clean_generation(text: str) -> str:
    """The answer part of a decoded generation: up to the first newline, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def stop_token_ids(adapter_or_tokenizer, generation_config=None) -> list[int]:
    """End-of-sequence ids: the tokenizer's, plus any the checkpoint lists (e.g. Llama-3's end-of-turn).

    Stop tokens belong to the model's chat format, not to the decoding strategy, so both back-ends keep them.
    """
    tokenizer = getattr(adapter_or_tokenizer, "tokenizer", adapter_or_tokenizer)
    if generation_config is None:
        generation_config = getattr(getattr(adapter_or_tokenizer, "model", None), "generation_config", None)
    ids = [tokenizer.eos_token_id]
    listed = getattr(generation_config, "eos_token_id", None)
    ids += listed if isinstance(listed, (list, tuple)) else [listed]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def greedy_config(max_new_tokens: int, pad_token_id: int, eos_token_ids: list[int]):
    """The one decoding configuration: greedy, one beam, no penalties, no sampling settings."""

    return GenerationConfig(
        do_sample=False, num_beams=1, num_return_sequences=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        pad_token_id=pad_token_id, eos_token_id=eos_token_ids or None,
        output_logits=True, return_dict_in_generate=True,
    )


@contextmanager
def _without_checkpoint_defaults(model):
    """Hide the checkpoint's generation_config during ``generate``.

    transformers fills every field our config leaves unset from ``model.generation_config``
    (suppress_tokens, bad_words_ids, sequence_bias, forced ids, ... have no neutral non-None value),
    so a blank one stands in for it while generating.
    """

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def logits_at(model, batch: dict, positions: list[list[int]]) -> list[torch.Tensor]:
    """Per row, float logits ``[len(positions[row]), vocab]`` at the given positions.

    The LM head runs only at the union of the rows' positions (``logits_to_keep``), so the
    ``[batch, seq, vocab]`` tensor of the whole prompt (image tokens included) is never made.
    """
    keep = sorted({q for row in positions for q in row})
    column = {q: i for i, q in enumerate(keep)}
    index = torch.tensor(keep, dtype=torch.long)  # on the CPU: valid for hidden states on any device (device maps)
    logits = model(**batch, logits_to_keep=index).logits
    return [logits[row, [column[q] for q in wanted]].float() for row, wanted in enumerate(positions)]


# --- the transformers back-end ------------------------------------------------


class HFBackend:
    """Answers generation and log-likelihood requests with a loaded ``ModelAdapter``."""

    name = "hf"

    def __init__(self, adapter, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens

    def prompt_text(self, prompt: Prompt) -> str:
        return _encode(self.adapter, prompt).prompt

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], batch_size: int = DEFAULT_BATCH_SIZE) -> list[Generation]:
        """Greedy answers, batched with left padding."""
        adapter = self.adapter
        config = greedy_config(self.max_new_tokens, adapter.pad_token_id, stop_token_ids(adapter))
        results: list[Generation] = []
        for chunk in _batches(list(prompts), batch_size):
            encodeds = [_encode(adapter, p) for p in chunk]
            batch = _collate(adapter, encodeds, "left")
            width = batch["input_ids"].shape[-1]
            with _without_checkpoint_defaults(adapter.model):
                output = adapter.model.generate(**batch, generation_config=config)
            new_tokens = output.sequences[:, width:]
            first_probs = torch.softmax(output.logits[0].float(), dim=-1)
            for row in range(len(chunk)):
                token = int(new_tokens[row, 0])
                text = adapter.tokenizer.decode(new_tokens[row], skip_special_tokens=True)
                results.append(Generation(clean_generation(text), float(first_probs[row, token])))
        return results

    @torch.no_grad()
    def next_token_confidence(self, prompts: Sequence[Prompt], batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
        """Max next-token probability after each prompt (the greedy first token's probability)."""
        adapter = self.adapter
        results: list[float] = []
        for chunk in _batches(list(prompts), batch_size):
            encodeds = [_encode(adapter, p) for p in chunk]
            batch = _collate(adapter, encodeds, "right")
            logits = logits_at(adapter.model, batch, [[e.length - 1] for e in encodeds])
            results.extend(float(torch.softmax(row[0], dim=-1).max()) for row in logits)
        return results

    @torch.no_grad()
    def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[Loglikelihood]:
        """Summed teacher-forced log-probability of each continuation, batched with right padding."""
        adapter = self.adapter
        results: list[Loglikelihood] = []
        for chunk in _batches(list(requests), batch_size):
            encodeds, spans = [], []
            for request in chunk:
                full = _encode(adapter, request.prompt, answer=request.continuation)
                if not full.answer_positions:
                    raise ValueError(f"continuation {request.continuation!r} maps to no token")
                # Score every answer token (and nothing a tokenizer may append after it, such as EOS).
                encodeds.append(full)
                spans.append((full.answer_positions[0], full.answer_positions[-1] + 1))
            batch = _collate(adapter, encodeds, "right")
            logits = logits_at(adapter.model, batch, [list(range(start - 1, end - 1)) for start, end in spans])
            for row, (start, end) in enumerate(spans):
                log_probs = torch.log_softmax(logits[row], dim=-1)
                targets = batch["input_ids"][row, start:end].to(log_probs.device)
                summed = float(log_probs.gather(-1, targets[:, None]).sum())
                confidence = float(log_probs[0].exp().max())
                results.append(Loglikelihood(summed, end - start, confidence))
        return results


# --- convenience functions (what tracing and editing call) ---------------------


def _backend(adapter, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    if isinstance(adapter, HFBackend):
        return adapter
    return HFBackend(adapter, max_new_tokens=max_new_tokens)


def generate(adapter, items, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE):
    """Greedy ``Generation`` (text + first-token confidence) for each Record or Prompt."""
    backend = _backend(adapter, max_new_tokens)
    return backend.generate([as_prompt(item, backend.adapter) for item in items], batch_size=batch_size)


def generate_answers(
    adapter, items, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[str]:
    """Greedy answer text for each Record or Prompt (records on a text-only adapter use ``text_only_question``)."""
    return [g.text for g in generate(adapter, items, max_new_tokens=max_new_tokens, batch_size=batch_size)]


def answer_logprobs(adapter, items, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """Summed log-prob of the gold answer for each item.

    ``items`` are Records (scored on ``answers[0]``), ``(prompt_or_record, answer)``
    pairs, or ``LoglikelihoodRequest``s.
    """
    backend = _backend(adapter)
    requests = [_as_request(item, backend.adapter) for item in items]
    return [r.logprob for r in backend.loglikelihood(requests, batch_size=batch_size)]


def confidences(adapter, items, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """Probability of the greedy first answer token for each Record or Prompt (one forward pass, no generation)."""
    backend = _backend(adapter)
    return backend.next_token_confidence([as_prompt(item, backend.adapter) for item in items], batch_size=batch_size)


def _as_request(item, adapter) -> LoglikelihoodRequest:
    if isinstance(item, LoglikelihoodRequest):
        return item
    if isinstance(item, tuple):
        prompt, answer = item
        return LoglikelihoodRequest(as_prompt(prompt, adapter), answer)
    if isinstance(item, Record):
        return LoglikelihoodRequest(as_prompt(item, adapter), item.answers[0])
    raise TypeError(f"expected a Record, (prompt, answer) pair or LoglikelihoodRequest, got {type(item).__name__}")

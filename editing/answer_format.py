"""Where the answer entity starts in a model's own answer, so edits keep the model's format.

flag-llava answers "The capital of Nepal is Kathmandu."; forcing a bare "Kabul"
right after the prompt teaches a format change that spreads to every question.
The edit instead forces "The capital of Nepal is" (the model's own words) and
scores only " Kabul" after it. The entity starts at the word boundary of the
pre-edit answer where the model finds the new answer's first token most likely
(one teacher-forced forward pass), unless the whole new answer is likelier
right after the prompt (one more batched pass); no hand-written templates.
"""

from __future__ import annotations

import re

import torch

from editing.methods.base import _to_model
from harness.scoring import Prompt, answer_logprobs


@torch.no_grad()
def entity_prefix(adapter, question: str, image, current: str, target: str) -> str:
    """The part of ``current`` (the model's pre-edit answer) before its answer entity ("" for a bare answer)."""
    current = current.strip()
    starts = [0] + [m.end() for m in re.finditer(r"\s+", current)]
    if not current or len(starts) == 1:
        return ""
    target_ids = adapter.answer_token_ids(target)
    if not target_ids:
        return ""
    encoded = adapter.encode(question, image, answer=current)
    if not encoded.answer_positions or encoded.answer_start is None:
        return ""
    logits = adapter.model(**_to_model(encoded.inputs, adapter)).logits[0]
    all_log_probs = torch.log_softmax(logits.float(), dim=-1)
    best, best_score = "", float("-inf")
    for char in starts[1:]:
        absolute = encoded.answer_start + char
        # The token that carries the word's first character (it may begin with the space before it).
        token = next((i for i in encoded.answer_positions if encoded.token_char_spans[i][1] > absolute), None)
        if token is None or token < 1:
            continue
        first = target_ids[0] if char == 0 else _first_token_after(adapter.tokenizer, current[:char].rstrip(), target)
        if first is None:
            continue
        score = float(all_log_probs[token - 1, first])
        if score > best_score:
            best, best_score = current[:char].rstrip(), score
    if not best:
        return ""
    # First tokens of different forms ("K" vs " Kabul") are not comparable: the best mid-answer cut and the bare
    # answer are compared on the whole target's log-probability instead.

    prompt = Prompt(question, image)
    bare, with_prefix, prefix_only = answer_logprobs(
        adapter, [(prompt, target), (prompt, f"{best} {target}"), (prompt, best)], batch_size=3)
    return best if with_prefix - prefix_only > bare else ""


def _first_token_after(tokenizer, prefix: str, target: str) -> int | None:
    """The id of ``target``'s first token when it follows ``prefix`` and a space (" Kabul", not the "K" that
    starts an answer right after the prompt)."""
    before = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    after = tokenizer(f"{prefix} {target}", add_special_tokens=False)["input_ids"]
    if len(after) <= len(before) or after[: len(before)] != before:
        return None
    return after[len(before)]

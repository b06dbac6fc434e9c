"""Token <-> character bookkeeping shared by every adapter.

The processor decides the expanded sequence (how many tokens an image
becomes); the fast tokenizer's offset mapping on the *unexpanded* prompt says
which characters each text token covers. ``align_expanded`` walks both so
every expanded token gets its character span back.
"""

from __future__ import annotations

NO_SPAN = (-1, -1)


def adds_special_tokens(tokenizer, text: str) -> bool:
    """Whether tokenizing ``text`` should add the tokenizer's special tokens (its BOS).

    Not when ``text`` already starts with the BOS: a chat template wrote it
    (Idefics3, Llama-3-Instruct), and adding it again would give the model a
    double BOS it never saw in training. transformers' own
    ``processor.apply_chat_template(tokenize=True)`` follows the same rule.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def tokenize_with_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (special tokens added as the processor would) and per-token char spans.

    Special tokens (BOS, image placeholders, chat markers) and empty spans get
    ``NO_SPAN``; the unknown token keeps its span (it stands for a real word).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets need one")
    enc = tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text), return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    special_ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    spans = []
    for token_id, (a, b), special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        special = token_id in special_ids or (special and token_id != tokenizer.unk_token_id)
        spans.append(NO_SPAN if special or b <= a else (int(a), int(b)))
    return list(enc["input_ids"]), spans


def align_expanded(
    expanded: list[int], ids: list[int], spans: list[tuple[int, int]], image_token_id: int | None
) -> list[tuple[int, int]]:
    """Char spans for the processor's ``expanded`` ids, given the unexpanded ``ids`` and ``spans``.

    One image placeholder in ``ids`` matches a run of image tokens in
    ``expanded``; tokens the processor inserted on its own (e.g. PaliGemma's
    BOS after the image) get ``NO_SPAN``.
    """
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(expanded):
        if image_token_id is not None and j < len(ids) and ids[j] == image_token_id == expanded[i]:
            while i < len(expanded) and expanded[i] == image_token_id:
                out.append(NO_SPAN)
                i += 1
            j += 1
        elif j < len(ids) and ids[j] == expanded[i]:
            out.append(spans[j])
            i += 1
            j += 1
        else:
            out.append(NO_SPAN)
            i += 1
    if j != len(ids):
        raise RuntimeError(
            f"the processor's token ids do not contain the tokenized prompt (matched {j} of {len(ids)} tokens)"
        )
    return out


def positions_overlapping(spans: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens whose span overlaps characters [start, end)."""
    return [i for i, (a, b) in enumerate(spans) if a >= 0 and a < end and b > start and b > a]

"""The corruptions of causal tracing, one class each, and the registry `trace --corruption NAME` reads.

A corruption makes one example's corrupted run from its clean input embeddings (what the language model really
receives, after any family-specific image processing): it returns a ``Corruption`` (patching.py) whose rows at the
corrupted positions are overwritten (``replacement``) or shifted by noise (``noise``, one draw per sample).
``bridge_positions`` (the model's own words naming the subject, targets.py) are corrupted with every kind, as text.
A new corruption: a subclass of ``CorruptionKind`` registered with ``register_corruption`` (docs/extending.md).
"""

from __future__ import annotations

import torch

from harness.models.base import Encoded, ModelAdapter
from harness.tracing.patching import Corruption
from vqa_constraints.errors import UserError

# ROME's factor of 3; ROME multiplies the std of its subjects' token embeddings, here the whole embedding matrix's
# (or the image features') is used, which needs no list of subjects.
NOISE_SCALE = 3.0
DEFAULT_REPLACE_TOKEN = " Paris"


class CorruptionKind:
    """One way of corrupting an example. Subclasses set ``name`` and implement ``corrupt``."""

    name = ""
    corrupts_image = False  # one traced unit per example (the image) instead of one per constraint; needs an image
    random = True  # averaged over --noise-samples draws; False: one deterministic corrupted run

    def corrupt(self, adapter: ModelAdapter, encoded: Encoded, clean_embeds: torch.Tensor, positions: list[int],
                bridge_positions: list[int], generator: torch.Generator, samples: int,
                replace_token: str) -> Corruption:
        """The corrupted run of one example: ``positions`` are its constraint's tokens (empty when the kind
        corrupts the image), ``clean_embeds`` is ``[1, T, H]``; draw any noise from ``generator``."""
        raise NotImplementedError

    def replacement(self, adapter: ModelAdapter, replace_token: str) -> dict | None:
        """The token written over the corrupted positions, as trace_stats.json records it (None: no such token)."""
        return None


CORRUPTIONS: dict[str, CorruptionKind] = {}


def register_corruption(kind: type[CorruptionKind]) -> type[CorruptionKind]:
    """Make ``kind`` available as `trace --corruption NAME` (usable as a class decorator)."""
    if not kind.name:
        raise ValueError(f"{kind.__name__}: set name, what --corruption calls it")
    if kind.name in CORRUPTIONS and type(CORRUPTIONS[kind.name]) is not kind:
        raise ValueError(f"corruption {kind.name!r} is already {type(CORRUPTIONS[kind.name]).__name__}")
    CORRUPTIONS[kind.name] = kind()
    return kind


def corruption_kind(name: str) -> CorruptionKind:
    if name not in CORRUPTIONS:
        raise UserError(f"--corruption {name!r}: choose from {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def replacement_token(tokenizer, replace_token: str) -> tuple[int, str]:
    """The token id (and its decoded text) that ``replace_token`` gets inside a sentence, after a space.

    A word is tokenized in context ("a Paris"), not alone: Llama-2's
    SentencePiece tokenizer turns " Paris" alone into a bare ``▁`` followed by
    ``▁Paris``, and the first of those would replace every constraint token
    with a space. A word of several tokens is represented by its first.
    """
    word = replace_token.strip()
    if not word:
        raise UserError(f"--replace-token {replace_token!r} is blank: give a word such as 'Paris'")
    context = f"a {word}"
    encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    start = len(context) - len(word)
    ids = [i for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if b > start and b > a]
    if not ids:
        raise UserError(f"--replace-token {replace_token!r} tokenizes to nothing")
    text = tokenizer.decode([ids[0]])
    if not text.strip():
        raise UserError(
            f"--replace-token {replace_token!r}: its first token in context (id {ids[0]}) is whitespace only; "
            "choose another word"
        )
    return int(ids[0]), text


def embedding_std(adapter: ModelAdapter) -> float:
    """Std of the token embedding matrix, computed once per loaded model (and weight version) in row chunks:
    a float copy of a 7B model's bf16 embedding matrix is 0.5 GB, too much to make per question.
    Kept on the adapter, not in a module-level table, so another model loaded at the same address
    can never read this one's value."""
    weight = adapter.embed_tokens().weight
    cached = getattr(adapter, "_embedding_std", None)
    if cached is not None and cached[0] is weight and cached[1] == weight._version:
        return cached[2]
    total = squares = 0.0
    with torch.no_grad():
        for rows in weight.detach().split(1024):
            rows = rows.double()
            total += float(rows.sum())
            squares += float((rows * rows).sum())
    count = weight.numel()
    std = ((squares - total * total / count) / (count - 1)) ** 0.5
    adapter._embedding_std = (weight, weight._version, std)
    return std



@register_corruption
class Replace(CorruptionKind):
    """Every constraint token's embedding becomes that of one word's token (``--replace-token``)."""

    name = "replace"
    random = False

    def corrupt(self, adapter, encoded, clean_embeds, positions, bridge_positions, generator, samples, replace_token):
        token_id, text = replacement_token(adapter.tokenizer, replace_token)
        replacement = adapter.embed_tokens().weight[token_id].detach()
        return Corruption(self.name, list(positions) + bridge_positions, replacement=replacement,
                          replacement_id=token_id, replacement_text=text)

    def replacement(self, adapter, replace_token):
        token_id, text = replacement_token(adapter.tokenizer, replace_token)
        return {"replace_token": replace_token, "token_id": token_id, "text": text}


class AddedNoise(CorruptionKind):
    """Gaussian noise, ``NOISE_SCALE`` times a std, added at the corrupted positions; the bridges get noise of the
    token-embedding scale whatever the kind's own scale is."""

    def scaled_positions(self, adapter, encoded, clean_embeds, positions) -> tuple[list[int], float]:
        """The positions this kind corrupts and its noise std."""
        raise NotImplementedError

    def corrupt(self, adapter, encoded, clean_embeds, positions, bridge_positions, generator, samples, replace_token):
        positions, scale = self.scaled_positions(adapter, encoded, clean_embeds, positions)
        scales = [scale] * len(positions)
        if bridge_positions:
            positions += bridge_positions
            scales += [NOISE_SCALE * embedding_std(adapter)] * len(bridge_positions)
        hidden = clean_embeds.shape[-1]
        noise = torch.randn(samples, len(positions), hidden, generator=generator) * torch.tensor(scales).view(1, -1, 1)
        return Corruption(self.name, positions, noise=noise.to(clean_embeds.device))


@register_corruption
class Noise(AddedNoise):
    """ROME's corruption: noise on the constraint tokens' embeddings, at the token-embedding scale."""

    name = "noise"

    def scaled_positions(self, adapter, encoded, clean_embeds, positions):
        return list(positions), NOISE_SCALE * embedding_std(adapter)


@register_corruption
class ImageNoise(AddedNoise):
    """Noise on the image features at the image positions, at their own scale: the image is the unit traced."""

    name = "image-noise"
    corrupts_image = True

    def scaled_positions(self, adapter, encoded, clean_embeds, positions):
        if not encoded.image_positions:
            raise UserError("--corruption image-noise needs an image: not available with --text-only or a text model")
        positions = list(encoded.image_positions)
        return positions, NOISE_SCALE * clean_embeds[0, positions].float().std().item()

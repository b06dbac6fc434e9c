"""The plain engine: one full forward pass of the whole model per restoration.

This is the paper's procedure as written (vision tower, projector and all
576 image tokens every time) and the yardstick the fast engine is tested
against. The corruption is applied by hooks where it happens in the model:
the token embeddings for ``replace``/``noise``, the projector's output for
``image-noise``.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch

from harness.hooks import edit_outputs

from .patching import Prepared, RestoreSet, answer_probability, restoring


class ReferenceEngine:
    name = "reference"

    def prepare(self, prepared: Prepared) -> None:
        prepared.p_corrupt = float(self.score(prepared, [frozenset()])[0])

    def score(self, prepared: Prepared, restore_sets: list[RestoreSet], progress=None) -> np.ndarray:
        """Mean (over noise samples) answer probability for each restore set."""
        samples = prepared.corruption.samples
        inputs = {key: value.repeat(samples, *([1] * (value.dim() - 1))) for key, value in prepared.inputs.items()}
        out = np.empty(len(restore_sets))
        for i, cells in enumerate(restore_sets):
            with ExitStack() as stack, torch.no_grad():
                stack.enter_context(corrupting(prepared))
                stack.enter_context(restoring(prepared, [cells], offset=0, samples=samples))
                logits = prepared.adapter.model(**inputs).logits[:, prepared.score_positions]
            out[i] = answer_probability(logits, prepared.target_tokens).mean().item()
            if progress is not None:
                progress(1)
        return out


def corrupting(prepared: Prepared):
    """Hook that corrupts the model's own embedding (or projector) output for a batch of noise samples."""
    corruption = prepared.corruption
    adapter = prepared.adapter
    index = torch.tensor(corruption.positions)

    if corruption.mode == "image-noise":
        def add_image_noise(features):
            shaped = features.reshape(corruption.samples, -1, features.shape[-1])
            return (shaped + corruption.noise.to(features.device, features.dtype)).reshape(features.shape)

        return edit_outputs({adapter.image_features_module(): add_image_noise})

    def corrupt_embeddings(embeds):
        embeds = embeds.clone()
        if corruption.mode == "replace":
            embeds[:, index] = corruption.replacement.to(embeds.device, embeds.dtype)
        else:
            embeds[:, index] = embeds[:, index] + corruption.noise.to(embeds.device, embeds.dtype)
        return embeds

    return edit_outputs({adapter.embed_tokens(): corrupt_embeddings})

"""The plain engine: one full forward pass of the whole model per restoration.

This is the paper's procedure as written (vision tower, projector and all
576 image tokens every time) and the yardstick the fast engine is tested
against. The corruption is applied by a hook at the language model's input
embeddings (``patching.corrupting``), for every mode and family.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch

from .patching import Prepared, RestoreSet, answer_probability, corrupting, restoring


class ReferenceEngine:
    name = "reference"

    def prepare(self, prepared: Prepared) -> None:
        prepared.extra["engine"] = self.name
        prepared.p_corrupt = float(self.score(prepared, [frozenset()])[0])

    def score(self, prepared: Prepared, restore_sets: list[RestoreSet], progress=None) -> np.ndarray:
        """Mean (over noise samples) answer probability for each restore set."""
        out = np.empty(len(restore_sets))
        for i, cells in enumerate(restore_sets):
            out[i] = self.sample_probabilities(prepared, cells).mean().item()
            if progress is not None:
                progress(1)
        return out

    def sample_probabilities(self, prepared: Prepared, cells: RestoreSet) -> torch.Tensor:
        """Answer probability under each noise sample with ``cells`` restored: [samples]."""
        samples = prepared.corruption.samples
        inputs = {key: value.repeat(samples, *([1] * (value.dim() - 1))) for key, value in prepared.inputs.items()}
        with ExitStack() as stack, torch.no_grad():
            stack.enter_context(corrupting(prepared))
            stack.enter_context(restoring(prepared, [cells], offset=0, samples=samples))
            logits = prepared.adapter.model(**inputs).logits[:, prepared.score_positions]
        return answer_probability(logits, prepared.target_tokens)

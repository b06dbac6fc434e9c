"""FT: plain fine-tuning of the edited layer's MLP output projection on the new answer.

The baseline MultEdit is compared with: the same matrix, the same
teacher-forced loss, but gradient steps on the weights themselves instead of a
closed-form solve. ``linf`` (set by FT-L) bounds every weight's change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editing.methods.base import EditHandle, EditMethod, check_inputs, only_trainable, request_prompts, target_loss
from editing.requests import EditRequest


@dataclass
class FineTune(EditMethod):
    key_position: str = "last"  # unused by the loss; kept so every method reads the same prompts
    steps: int = 25
    lr: float = 5e-3  # Adam step, relative to the weight matrix's RMS
    stop_loss: float = 0.03
    linf: float | None = None  # bound on |W - W0| per weight, relative to the weight matrix's RMS

    name = "ft"

    def apply(self, adapter, requests: Sequence[EditRequest], layers: Sequence[int]) -> EditHandle:
        modules = check_inputs(adapter, requests, layers)
        prompts = [p for r in requests for p in request_prompts(adapter, r, self.key_position)]
        weights = [m.weight for m in modules]
        handle = EditHandle.snapshot(weights)
        originals = [saved for _, saved in handle.saved]
        scales = [float(w.detach().float().pow(2).mean().sqrt()) or 1.0 for w in weights]
        # One Adam per weight so the step size follows each matrix's own scale.
        optimisers = [torch.optim.Adam([w], lr=self.lr * s) for w, s in zip(weights, scales)]
        steps_taken, loss_value = 0, float("nan")
        try:
            with only_trainable(adapter.model, weights):
                for step in range(self.steps + 1):
                    loss = target_loss(adapter, prompts)
                    loss_value = float(loss.detach())
                    if loss_value < self.stop_loss or step == self.steps:
                        break
                    for optimiser in optimisers:
                        optimiser.zero_grad()
                    loss.backward()
                    for optimiser in optimisers:
                        optimiser.step()
                    steps_taken += 1
                    if self.linf is not None:
                        self._project(weights, originals, scales)
        except Exception:
            handle.restore()
            raise
        handle.info = {"layers": [int(l) for l in layers], "steps": steps_taken, "final_nll": loss_value}
        return handle

    @torch.no_grad()
    def _project(self, weights, originals, scales) -> None:
        """Clamp each weight back into W0 +/- linf * RMS(W0)."""
        for weight, original, scale in zip(weights, originals, scales):
            bound = self.linf * scale
            weight.copy_(original + (weight - original).clamp(-bound, bound))

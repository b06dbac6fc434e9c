"""FT: plain fine-tuning of the edited layer's MLP output projection on the new answer.

The baseline MultEdit is compared with: the same matrix, the same
teacher-forced loss (the new answer after the model's own answer prefix), but
gradient steps on the weights themselves instead of a closed-form solve. The
steps train fp32 master copies (``EditHandle``): Adam's small steps on bf16
weights would mostly round away. ``linf`` (set by FT-L) bounds every weight's
change, and the run records whether that bound ever clipped a step.
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
    linf: float | None = None  # bound on |W - W0| per weight, absolute (ROME's FT-L norm_constraint)
    linf_rms: float | None = None  # the same bound relative to each edited matrix's weight RMS (used when linf is None)

    name = "ft"

    def apply(self, adapter, requests: Sequence[EditRequest], layers: Sequence[int]) -> EditHandle:
        modules = check_inputs(adapter, requests, layers)
        prompts = [p for r in requests for p in request_prompts(adapter, r, self.key_position)]
        handle = EditHandle.master_copies(modules)
        weights = handle.weights
        originals = [w.detach().clone() for w in weights]
        scales = [float(w.detach().pow(2).mean().sqrt()) or 1.0 for w in weights]
        # One Adam per weight so the step size follows each matrix's own scale.
        optimisers = [torch.optim.Adam([w], lr=self.lr * s) for w, s in zip(weights, scales)]
        steps_taken, loss_value, clipped_steps = 0, float("nan"), 0
        bounds = self.bounds(scales)
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
                    if bounds is not None:
                        clipped_steps += self._project(weights, originals, bounds)
        except Exception:
            handle.restore()
            raise
        handle.info = {"layers": [int(l) for l in layers], "steps": steps_taken, "final_nll": loss_value}
        if bounds is not None:
            with torch.no_grad():
                at_bound = sum(int(((w - o).abs() >= b * (1 - 1e-6)).sum())
                               for w, o, b in zip(weights, originals, bounds))
            handle.info.update({"linf": bounds[0], "bound_active": clipped_steps > 0, "clipped_steps": clipped_steps,
                                "weights_at_bound": at_bound / sum(w.numel() for w in weights)})
        return handle

    def bounds(self, scales: list[float]) -> list[float] | None:
        """The L-infinity bound of each edited matrix (``linf``, else ``linf_rms`` times its weight RMS), or None."""
        if self.linf is not None:
            return [float(self.linf)] * len(scales)
        if self.linf_rms is not None:
            return [float(self.linf_rms) * s for s in scales]
        return None

    @torch.no_grad()
    def _project(self, weights, originals, bounds) -> int:
        """Clamp each weight back into W0 +/- its bound; 1 when that moved any weight (the bound was active), else 0."""
        active = False
        for weight, original, bound in zip(weights, originals, bounds):
            change = weight - original
            if bool((change.abs() > bound).any()):
                active = True
                weight.copy_(original + change.clamp(-bound, bound))
        return int(active)

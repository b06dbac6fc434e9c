"""MultEdit: a closed-form edit of an early causal MLP layer's output projection.

For each request, read the key k (the input of ``down_proj`` at the key
position) and the value it currently produces, v0 = W0 k. Find a residual
delta by a few steps of gradient descent so that writing v0 + delta at that
position makes the model produce the whole new answer (teacher forced), with a
small penalty on the size of delta. Then solve, for all requests at once,

    W = argmin ||W K - V*||^2 + lam ||W - W0||^2,     V* = V0 + Delta,

in its low-rank form W = W0 + (V* - W0 K)(K^T K + lam I)^-1 K^T, which inverts
an n x n matrix (n = number of edits) instead of a d x d one.

With several layers, the edit is spread over them from first to last: at each
layer the residual is re-optimised with the earlier layers already edited and
that layer writes 1/(layers left) of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editing.methods.base import (
    EditHandle,
    EditMethod,
    SkipEdit,
    TeacherForced,
    check_inputs,
    only_trainable,
    request_prompts,
    target_loss,
)
from editing.requests import EditRequest
from harness.hooks import edit_outputs, record_inputs


def closed_form_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||W K - V||^2 + lam ||W - W0||^2 via the n x n system (W0: out x in, K: in x n, V: out x n)."""
    gram = K.T @ K + lam * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    # (V - W0 K) gram^-1 K^T, solved as gram X = K^T so no inverse is formed.
    return W0 + (V - W0 @ K) @ torch.linalg.solve(gram, K.T)


def direct_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """The same minimiser written directly: (V K^T + lam W0)(K K^T + lam I)^-1 (an in x in inverse; tests only)."""
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    return (V @ K.T + lam * W0) @ torch.linalg.inv(K @ K.T + lam * eye)


@dataclass
class MultEdit(EditMethod):
    key_position: str = "last"
    steps: int = 25  # gradient steps for each residual delta
    lr: float = 0.5
    delta_decay: float = 1e-3  # penalty on ||delta||^2 / ||v0||^2
    max_delta_ratio: float = 4.0  # ||delta|| is clamped to this times ||v0||
    stop_loss: float = 0.03  # stop early once the answer NLL is this low
    lam: float = 1e-2  # ridge weight, relative to the mean squared key norm

    name = "multedit"

    def preserve(self, requests: Sequence[EditRequest]) -> None:
        """Questions whose current values the edit must keep: their keys join K with V* = W0 k.

        That is still argmin ||W K - V*||^2 + lam ||W - W0||^2, with more columns;
        it stops an edit from spilling onto inputs whose keys resemble the edited one.
        """
        self._preserve = list(requests)
        self._preserve_keys = {}

    def _preserved_keys(self, adapter, module, layer: int) -> torch.Tensor | None:
        requests = getattr(self, "_preserve", [])
        if not requests:
            return None
        cache = self._preserve_keys
        if layer not in cache:  # read once, with the original weights
            keys = []
            for request in requests:
                prompt = request_prompts(adapter, request, self.key_position)[0]
                keys.append(_key_and_value(adapter, module, prompt)[0])
            cache[layer] = torch.stack(keys, 1)
        return cache[layer]

    def apply(self, adapter, requests: Sequence[EditRequest], layers: Sequence[int]) -> EditHandle:
        modules = check_inputs(adapter, requests, layers)
        prompts = [request_prompts(adapter, r, self.key_position) for r in requests]
        handle = EditHandle.snapshot([m.weight for m in modules])
        handle.info = {"layers": [int(l) for l in layers], "per_layer": []}
        try:
            for index, module in enumerate(modules):
                share = 1.0 / (len(modules) - index)
                keys, deltas, losses = [], [], []
                for request_prompts_ in prompts:
                    key, value = _key_and_value(adapter, module, request_prompts_[0])
                    delta, loss = self._optimise_delta(adapter, module, request_prompts_, value)
                    keys.append(key)
                    deltas.append(delta * share)
                    losses.append(loss)
                K, D = torch.stack(keys, 1), torch.stack(deltas, 1)
                kept = self._preserved_keys(adapter, module, int(layers[index]))
                if kept is not None:
                    K = torch.cat([K, kept.to(K.device)], 1)
                    D = torch.cat([D, torch.zeros(D.shape[0], kept.shape[1], dtype=D.dtype, device=D.device)], 1)
                self._write(module, K, D)
                handle.info["per_layer"].append({"layer": int(layers[index]), "final_nll": losses})
        except Exception:
            handle.restore()
            raise
        return handle

    def _optimise_delta(self, adapter, module, prompts: Sequence[TeacherForced], v0: torch.Tensor):
        """The residual that, added to the projection's output at the key position, yields the target."""
        delta = torch.zeros_like(v0, dtype=torch.float32, requires_grad=True)
        v0_norm = float(v0.float().norm()) or 1.0
        optimiser = torch.optim.Adam([delta], lr=self.lr * v0_norm / v0.numel() ** 0.5)
        loss_value = float("nan")
        positions = [p.key_position for p in prompts]

        def add_delta(output, position):
            output = output.clone()
            output[0, position] = output[0, position] + delta.to(output.dtype)
            return output

        with only_trainable(adapter.model, []):
            for step in range(self.steps + 1):
                losses = []
                for prompt, position in zip(prompts, positions):
                    with edit_outputs({module: lambda out, position=position: add_delta(out, position)}):
                        losses.append(target_loss(adapter, [prompt]))
                nll = torch.stack(losses).mean()
                loss_value = float(nll.detach())
                if loss_value < self.stop_loss or step == self.steps:
                    break
                loss = nll + self.delta_decay * delta.pow(2).sum() / v0_norm**2
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    limit = self.max_delta_ratio * v0_norm
                    norm = delta.norm()
                    if norm > limit:
                        delta.mul_(limit / norm)
        return delta.detach(), loss_value

    @torch.no_grad()
    def _write(self, module, K: torch.Tensor, deltas: torch.Tensor) -> None:
        W0 = module.weight.float()
        K = K.float().to(W0.device)
        lam = self.lam * float(K.pow(2).sum(0).mean())  # relative, so lam means the same for any model
        V = W0 @ K + deltas.to(W0.device)
        if not torch.isfinite(V).all():
            raise SkipEdit("the optimised value is not finite")
        module.weight.copy_(closed_form_update(W0, K, V, lam).to(module.weight.dtype))


@torch.no_grad()
def _key_and_value(adapter, module, prompt: TeacherForced) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's input (key) and output (value) at the prompt's key position, with current weights."""
    with record_inputs({"key": module}) as store:
        adapter.model(**prompt.inputs)
    key = store["key"][0, prompt.key_position].float()
    value = module(store["key"][0, prompt.key_position][None])[0].float()
    return key, value

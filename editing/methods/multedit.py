"""MultEdit: a closed-form edit of an early causal MLP layer's output projection.

For each request, read the key k (the input of ``down_proj`` at the key
position) and the value it currently produces, v0 = W0 k. Find a residual
delta by gradient descent so that writing v0 + delta at that position makes the
model produce the new answer (teacher forced after the model's own answer
prefix), with a small penalty on the size of delta; it stops once the answer NLL
is low or has stopped improving. With several requests the deltas are optimised
together, one right-padded batch per step (MEMIT-style). Then, for all requests
at once, one of two closed forms (R = V* - W0 K, the residuals to write):

- ``lambda`` (``multedit``): W = argmin ||W K - V*||^2 + lam ||W - W0||^2
  = W0 + R (K^T K + lam I)^-1 K^T: an n x n system (n = number of edits).
- ``covariance`` (``multedit-cov``, ROME's constraint): W K = V* exactly, while
  ||(W - W0) k||^2 averaged over the key distribution (covariance C) is least:
  W = W0 + R (K^T C^-1 K)^-1 (C^-1 K)^T. C^-1 K comes from a cached Cholesky
  factor of C, so no d x d inverse is formed.
- ``least-squares`` (``memit-ls``, MEMIT's batch objective): a residual instead
  of the equality, W = argmin ||W K - V*||^2 + mu ||(W - W0) C^1/2||^2
  = W0 + R K^T (mu C + K K^T)^-1 = W0 + R (mu I + K^T C^-1 K)^-1 (C^-1 K)^T,
  with mu = mom2_weight * d (MEMIT's mom2_update_weight, per key dimension:
  E[k^T C^-1 k] = d, so mom2_weight 1 writes about half of a typical key's residual).

With several layers, the edit is spread over them from first to last: at each
layer the residual is re-optimised with the earlier layers already edited and
that layer writes 1/(layers left) of it. The weights edited are fp32 master
copies (see ``EditHandle``), so a bf16 model keeps the whole update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from editing.key_stats import corpus_covariances, key_covariances
from editing.methods.base import (
    EditHandle,
    EditMethod,
    SkipEdit,
    TeacherForced,
    check_inputs,
    only_trainable,
    request_prompts,
)
from editing.prefix_cache import TOLERANCE, PrefixCachedForward, logits_to_keep
from editing.requests import EditRequest
from harness.hooks import edit_outputs, record_inputs
from vqa_constraints.errors import UserError

FORMS = ("lambda", "covariance", "least-squares")


def closed_form_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||W K - V||^2 + lam ||W - W0||^2 via the n x n system (W0: out x in, K: in x n, V: out x n)."""
    gram = K.T @ K + lam * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    # (V - W0 K) gram^-1 K^T, solved as gram X = K^T so no inverse is formed.
    return W0 + (V - W0 @ K) @ torch.linalg.solve(gram, K.T)


def direct_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """The same minimiser written directly: (V K^T + lam W0)(K K^T + lam I)^-1 (an in x in inverse; tests only)."""
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    return (V @ K.T + lam * W0) @ torch.linalg.inv(K @ K.T + lam * eye)


def covariance_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, solve_c, ridge: float = 0.0) -> torch.Tensor:
    """W K = V exactly, least change on keys distributed with covariance C; ``solve_c(K)`` returns C^-1 K.

    ``ridge`` (relative to the mean diagonal of K^T C^-1 K) softens the constraints just enough that two
    edits with the same key (the same question asked twice) meet halfway instead of making it singular.
    """
    CK = solve_c(K).to(K.dtype)  # in x n
    gram = K.T @ CK
    if ridge:
        gram = gram + ridge * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                        device=gram.device)
    return W0 + (V - W0 @ K) @ torch.linalg.solve(gram, CK.T)


def least_squares_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, solve_c, mu: float) -> torch.Tensor:
    """MEMIT's least squares: argmin ||W K - V||^2 + mu ||(W - W0) C^1/2||^2 (``solve_c(K)`` returns C^-1 K)."""
    CK = solve_c(K).to(K.dtype)
    gram = K.T @ CK + mu * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return W0 + (V - W0 @ K) @ torch.linalg.solve(gram, CK.T)


def direct_least_squares_update(W0, K, V, C, mu: float) -> torch.Tensor:
    """The same minimiser as MEMIT writes it: W0 + R K^T (mu C + K K^T)^-1 (tests only)."""
    return W0 + (V - W0 @ K) @ K.T @ torch.linalg.inv(mu * C + K @ K.T)


def direct_covariance_update(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """ROME's formula with explicit inverses: W0 + R (K^T C^-1 K)^-1 K^T C^-1 (tests only)."""
    C_inv = torch.linalg.inv(C)
    return W0 + (V - W0 @ K) @ torch.linalg.inv(K.T @ C_inv @ K) @ K.T @ C_inv


@dataclass
class MultEdit(EditMethod):
    key_position: str = "last"
    steps: int = 25  # at most this many gradient steps for the residual deltas
    lr: float = 0.5
    delta_decay: float = 1e-3  # penalty on ||delta||^2 / ||v0||^2
    max_delta_ratio: float = 4.0  # ||delta|| is clamped to this times ||v0||
    stop_loss: float = 0.03  # stop once every answer NLL is this low...
    patience: int = 3  # ...or the mean NLL has not fallen by min_gain for this many steps
    min_gain: float = 0.02
    lam: float = 1e-2  # ridge weight, relative to the mean squared key norm (lambda form)
    form: str = "lambda"
    cov_ridge: float = 1e-3  # added to C's diagonal, relative to tr(C)/d (covariance and least-squares forms)
    mom2_weight: float = 0.1  # least-squares form: mu = mom2_weight * d
    delta_batch: int = 8  # requests whose deltas share a forward pass (memory grows with it)
    cache_prefix: bool = True  # delta steps run from the earliest key position on (editing/prefix_cache.py)

    name = "multedit"

    def __post_init__(self):
        if self.form not in FORMS:
            raise UserError(f"unknown MultEdit form {self.form!r}; choose from {', '.join(FORMS)}")
        self._key_corpus: tuple[list, str] | None = None
        self._generic = None  # a key_stats.GenericCorpus: C from the model's own text (what `edit` uses)
        self._cov: dict = {}
        self._forward_kinds: set[str] = set()  # how the delta steps ran: prefix-cached and/or full
        self._start_layers: set[int] = set()  # the decoder layer prefix-cached steps started at (0: all layers)

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def preserve(self, requests: Sequence[EditRequest]) -> None:
        """Questions whose current values the edit must keep: their keys join K with V* = W0 k.

        That is still one of the closed forms, with more columns; it stops an
        edit from spilling onto inputs whose keys resemble the edited one.
        """
        self._preserve = list(requests)
        self._preserve_keys = {}

    def key_corpus(self, items: Sequence, fingerprint: str) -> None:
        """Questions (Records or Prompts) whose keys at every position estimate C (covariance form)."""
        self._key_corpus = (list(items), fingerprint)
        self._cov = {}

    def generic_corpus(self, corpus) -> None:
        """Estimate C from the model's own sampled text (a ``key_stats.GenericCorpus``) instead of questions."""
        self._generic = corpus
        self._cov = {}

    def covariance(self, adapter, layer: int):
        """C for ``layer`` (computed once per method instance, from the original weights; cached on disk)."""

        if layer not in self._cov and self._generic is not None:
            self._cov.update(corpus_covariances(adapter, [layer], self._generic, self.cov_ridge))
        if layer not in self._cov:
            if not self._key_corpus:
                raise UserError("multedit-cov needs questions to estimate the key covariance from (key_corpus)")
            items, fingerprint = self._key_corpus
            self._cov.update(key_covariances(adapter, [layer], items, fingerprint, self.cov_ridge))
        return self._cov[layer]

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
        prompts = [request_prompts(adapter, r, self.key_position)[0] for r in requests]
        covs = {int(l): self.covariance(adapter, int(l)) for l in layers} if self.form != "lambda" else {}
        kept = {int(l): self._preserved_keys(adapter, m, int(l)) for l, m in zip(layers, modules)}
        handle = EditHandle.master_copies(modules)
        self._forward_kinds, self._start_layers = set(), set()
        seconds = {"keys": 0.0, "delta": 0.0, "solve": 0.0}
        handle.info = {"layers": [int(l) for l in layers], "form": self.form, "per_layer": [], "seconds": seconds}
        try:
            for index, module in enumerate(modules):
                layer = int(layers[index])
                share = 1.0 / (len(modules) - index)
                began = time.perf_counter()
                keys, values = zip(*[_key_and_value(adapter, module, p) for p in prompts])
                seconds["keys"] += time.perf_counter() - began
                began = time.perf_counter()
                deltas, losses, steps = [], [], []
                for start in range(0, len(prompts), self.delta_batch):
                    part = slice(start, start + self.delta_batch)
                    delta, loss, taken = self._optimise_deltas(adapter, module, prompts[part],
                                                               torch.stack(values[part]), layer)
                    deltas.append(delta)
                    losses += loss
                    steps.append(taken)
                deltas = torch.cat(deltas)
                seconds["delta"] += time.perf_counter() - began
                began = time.perf_counter()
                K, D = torch.stack(keys, 1), deltas.T * share
                if kept[layer] is not None:
                    extra = kept[layer].to(K.device)
                    K = torch.cat([K, extra], 1)
                    D = torch.cat([D, torch.zeros(D.shape[0], extra.shape[1], dtype=D.dtype, device=D.device)], 1)
                self._write(module, K, D, covs.get(layer))
                seconds["solve"] += time.perf_counter() - began
                handle.info["per_layer"].append({"layer": layer, "final_nll": losses, "steps": steps})
            handle.info["delta_forward"] = sorted(self._forward_kinds)
            handle.info["delta_start_layers"] = sorted(self._start_layers)
        except Exception:
            handle.restore()
            raise
        return handle

    def _optimise_deltas(self, adapter, module, prompts: Sequence[TeacherForced], v0: torch.Tensor, layer: int = 0):
        """Residuals (n x d) that, added to the projection's output at each key position, yield the targets.

        All requests share each forward pass (right padding keeps every row's
        positions); each delta only touches its own row, so the summed loss
        gives each its own gradient.
        """
        n = len(prompts)
        batch = adapter.collate([p.encoded for p in prompts], padding_side="right")
        batch = {k: (v.to(adapter.dtype) if v.is_floating_point() else v) for k, v in batch.items()}
        # Only the answer positions need logits: the full vocabulary at every image token is most of the memory.
        keep = logits_to_keep(adapter, batch["input_ids"].shape[1] - min(p.answer_start for p in prompts) + 1)
        offset = batch["input_ids"].shape[1] - keep if keep else 0
        rows = torch.arange(n, device=adapter.device)
        positions = torch.tensor([p.key_position for p in prompts], device=adapter.device)
        cached = self._prefix_cached(adapter, batch, prompts, offset, keep, layer) if self.cache_prefix else None
        if cached is not None:  # steps run from the earliest key position on (editing/prefix_cache.py)
            positions, offset = positions - cached.offset, cached.offset
        delta = torch.zeros(n, v0.shape[1], dtype=torch.float32, device=v0.device, requires_grad=True)
        v0_norm = v0.float().norm(dim=1).clamp_min(1e-6)
        scale = (v0_norm / v0.shape[1] ** 0.5)[:, None]  # Adam moves each delta at its own value's scale
        optimiser = torch.optim.Adam([delta], lr=self.lr)
        best, stale, steps = float("inf"), 0, 0
        losses = [float("nan")] * n

        def add_delta(output):
            output = output.clone()
            output[rows, positions] = output[rows, positions] + (delta * scale).to(output.dtype)
            return output

        with only_trainable(adapter.model, []):
            for step in range(self.steps + 1):
                with edit_outputs({module: add_delta}):
                    if cached is not None:
                        logits = cached.logits()
                    else:
                        logits = adapter.model(**batch, **({"logits_to_keep": keep} if keep else {})).logits
                nll = torch.stack([p.nll(logits[i : i + 1], offset) for i, p in enumerate(prompts)])
                losses = [float(x) for x in nll.detach()]
                mean = sum(losses) / n
                stale = 0 if mean < best - self.min_gain else stale + 1
                best = min(best, mean)
                if max(losses) < self.stop_loss or stale >= self.patience or step == self.steps:
                    break
                penalty = ((delta * scale).pow(2).sum(1) / v0_norm**2).sum()
                loss = nll.sum() + self.delta_decay * penalty
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                steps += 1
                with torch.no_grad():
                    norm = (delta * scale).norm(dim=1)
                    factor = (self.max_delta_ratio * v0_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
                    delta.mul_(factor[:, None])
        return (delta * scale).detach(), losses, steps

    def _prefix_cached(self, adapter, batch, prompts, offset: int, keep: int,
                       layer: int = 0) -> PrefixCachedForward | None:
        """A forward that caches everything before the earliest key position, if it reproduces the full model's
        answer NLL at delta = 0 (else None: full forwards)."""
        start = min(p.key_position for p in prompts)
        if start < 1:
            return None
        with torch.no_grad():
            full = adapter.model(**batch, **({"logits_to_keep": keep} if keep else {})).logits
            expected = [float(p.nll(full[i : i + 1], offset)) for i, p in enumerate(prompts)]
            try:
                cached = PrefixCachedForward(adapter, batch, start, start_layer=layer)
                logits = cached.logits()
            except (TypeError, ValueError, RuntimeError, AttributeError):
                self._forward_kinds.add("full")
                return None
            got = [float(p.nll(logits[i : i + 1], start)) for i, p in enumerate(prompts)]
        if max(abs(a - b) for a, b in zip(expected, got)) > TOLERANCE:
            self._forward_kinds.add("full")
            return None
        self._forward_kinds.add("prefix-cached")
        self._start_layers.add(cached.start_layer)
        return cached

    @torch.no_grad()
    def _write(self, module, K: torch.Tensor, deltas: torch.Tensor, cov=None) -> None:
        W0 = module.weight  # the fp32 master copy
        K = K.float().to(W0.device)
        V = W0 @ K + deltas.to(W0.device)
        if not torch.isfinite(V).all():
            raise SkipEdit("the optimised value is not finite")
        solve_c = (lambda M: cov.solve(M.cpu()).to(M.device)) if cov is not None else None
        if cov is None:
            lam = self.lam * float(K.pow(2).sum(0).mean())  # relative, so lam means the same for any model
            W = closed_form_update(W0, K, V, lam)
        elif self.form == "least-squares":
            W = least_squares_update(W0.double(), K.double(), V.double(), solve_c, self.mom2_weight * K.shape[0])
        else:
            W = covariance_update(W0.double(), K.double(), V.double(), lambda M: cov.solve(M.cpu()).to(M.device), ridge=1e-6)
        if not torch.isfinite(W).all():
            raise SkipEdit("the closed-form solution is not finite")
        W0.copy_(W.to(W0.dtype))


@dataclass
class MultEditCovariance(MultEdit):
    form: str = "covariance"

    name = "multedit-cov"


@dataclass
class MemitLeastSquares(MultEdit):
    form: str = "least-squares"

    name = "memit-ls"


@torch.no_grad()
def _key_and_value(adapter, module, prompt: TeacherForced) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's input (key) and output (value) at the prompt's key position, with current weights."""
    with record_inputs({"key": module}) as store:
        adapter.model(**prompt.inputs)
    key = store["key"][0, prompt.key_position].float()
    value = module(store["key"][0, prompt.key_position][None])[0].float()
    return key, value

"""Key statistics for MultEdit's covariance form: C = E[k k^T] over many keys.

Keys are the inputs of a layer's MLP output projection at every position of
the build's questions (image tokens included), as ROME and MEMIT estimate
their second moment from text. C is cached on disk keyed by content: a hash of
every weight the keys depend on (layers after the edited one, the edited
projection itself and the LM head are left out), the data fingerprint, the
question ids and N, so a changed model or data set never reuses a stale C.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from harness.hooks import record_inputs
from harness.scoring import Prompt, as_prompt

FORMAT = 1


@dataclass
class KeyCovariance:
    layer: int
    cov: torch.Tensor  # d x d, float64, ridge included
    chol: torch.Tensor  # its Cholesky factor (lower), so C^-1 K costs two triangular solves
    n_keys: int  # key vectors averaged
    n_questions: int
    ridge: float  # added to the diagonal, relative to tr(C)/d
    cache_file: str

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """C^-1 K without forming C^-1."""
        return torch.cholesky_solve(K.to(self.chol.dtype), self.chol)

    def describe(self) -> dict:
        return {"layer": self.layer, "n_keys": self.n_keys, "n_questions": self.n_questions,
                "ridge": self.ridge, "cache_file": self.cache_file}


class _Stop(Exception):
    """Raised from a hook once every needed layer has been read: the rest of the forward is wasted work."""


def upstream_hash(adapter, layer: int) -> str:
    """sha256 of every parameter the keys of ``layer`` depend on."""
    layers = adapter.layers()
    excluded = {id(p) for later in layers[layer + 1:] for p in later.parameters()}
    excluded |= {id(p) for p in adapter.mlp_out_proj(layer).parameters()}
    head = adapter.model.get_output_embeddings()
    if head is not None and head.weight is not adapter.embed_tokens().weight:
        excluded |= {id(p) for p in head.parameters()}
    digest = hashlib.sha256()
    for name, param in adapter.model.named_parameters():
        if id(param) in excluded:
            continue
        t = param.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    from harness.zoo.cache import cache_root

    return cache_root() / "key-stats"


def key_covariances(adapter, layers: Sequence[int], items: Sequence, fingerprint: str,
                    ridge: float = 1e-3) -> dict[int, KeyCovariance]:
    """C for each of ``layers`` from the keys of ``items`` (Records or Prompts), cached on disk."""
    prompts = [as_prompt(item, adapter) for item in items]
    ids = [getattr(item, "id", p.question) for item, p in zip(items, prompts)]
    keys = {}
    for layer in layers:
        content = {"format": FORMAT, "weights": upstream_hash(adapter, layer), "data": fingerprint, "ids": ids,
                   "n": len(prompts), "dtype": str(adapter.dtype), "layer": int(layer)}
        keys[int(layer)] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    result, missing = {}, []
    for layer, key in keys.items():
        path = cache_dir() / f"keycov-{key}.safetensors"
        loaded = _load(path)
        if loaded is None:
            missing.append(layer)
        else:
            result[layer] = _finish(layer, *loaded, ridge, path)
    if missing:
        sums, counts = _accumulate(adapter, missing, prompts)
        for layer in missing:
            path = cache_dir() / f"keycov-{keys[layer]}.safetensors"
            second = sums[layer] / counts
            _save(path, second, counts, len(prompts))
            result[layer] = _finish(layer, second, counts, len(prompts), ridge, path)
    return {layer: result[layer] for layer in keys}


@torch.no_grad()
def _accumulate(adapter, layers: Sequence[int], prompts: Sequence[Prompt]) -> tuple[dict, int]:
    modules = {layer: adapter.mlp_out_proj(layer) for layer in layers}
    last = modules[max(layers)]
    sums = {layer: None for layer in layers}
    count = 0

    def stop(_module, _inputs, _output):
        raise _Stop

    for prompt in prompts:
        encoded = adapter.encode(prompt.question, prompt.image)
        inputs = {k: (v.to(adapter.dtype) if v.is_floating_point() else v).to(adapter.device)
                  for k, v in encoded.inputs.items()}
        handle = last.register_forward_hook(stop)
        try:
            with record_inputs({layer: module for layer, module in modules.items()}) as store:
                try:
                    adapter.model(**inputs)
                except _Stop:
                    pass
        finally:
            handle.remove()
        for layer in layers:
            keys = store[layer][0].to(torch.float64)
            sums[layer] = keys.T @ keys if sums[layer] is None else sums[layer] + keys.T @ keys
        count += int(store[layers[0]].shape[1])
    return sums, count


def _finish(layer, second: torch.Tensor, n_keys: int, n_questions: int, ridge: float, path: Path) -> KeyCovariance:
    d = second.shape[0]
    cov = second + ridge * float(torch.trace(second)) / d * torch.eye(d, dtype=second.dtype)
    return KeyCovariance(int(layer), cov, torch.linalg.cholesky(cov), int(n_keys), int(n_questions), ridge, str(path))


def _load(path: Path):
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return f.get_tensor("second_moment"), int(meta["n_keys"]), int(meta["n_questions"])


def _save(path: Path, second: torch.Tensor, n_keys: int, n_questions: int) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"second_moment": second.contiguous()}, str(tmp),
              metadata={"n_keys": str(n_keys), "n_questions": str(n_questions)})
    os.replace(tmp, path)

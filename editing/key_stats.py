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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from harness.hooks import record_inputs, stop_after
from harness.scoring import Prompt, as_prompt
from harness.zoo.cache import cache_root
from vqa_constraints.files import atomic_path

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
    for prompt in prompts:
        encoded = adapter.encode(prompt.question, prompt.image)
        inputs = {k: (v.to(adapter.dtype) if v.is_floating_point() else v).to(adapter.device)
                  for k, v in encoded.inputs.items()}
        with stop_after(last), record_inputs({layer: module for layer, module in modules.items()}) as store:
            adapter.model(**inputs)
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

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return f.get_tensor("second_moment"), int(meta["n_keys"]), int(meta["n_questions"])


def _save(path: Path, second: torch.Tensor, n_keys: int, n_questions: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"second_moment": second.contiguous()}, str(tmp),
                  metadata={"n_keys": str(n_keys), "n_questions": str(n_questions)})


# --- a generic corpus: the language model's own text ---------------------------

CORPUS_FORMAT = 1


@dataclass(frozen=True)
class GenericCorpus:
    """Text sampled from the language model itself (temperature 1, no image), one random ordinary token to start
    each sequence: keys of the model's own text, not of the benchmark's question templates (ROME and MEMIT use
    Wikipedia; an offline machine has none, and the model's own text is what its MLP keys usually see)."""

    n_keys: int = 20000  # at least this many key vectors (every position of every sequence)
    length: int = 128  # tokens per sequence, the start token included
    batch: int = 32  # sequences sampled at once
    seed: int = 0

    def sequences(self) -> int:
        return -(-self.n_keys // self.length)


def model_hash(adapter) -> str:
    """sha256 of every parameter: the sampled text depends on the whole model."""
    digest = hashlib.sha256()
    for name, param in adapter.model.named_parameters():
        t = param.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def sample_corpus(adapter, corpus: GenericCorpus) -> torch.Tensor:
    """(sequences, length) token ids sampled from the model, cached on disk by the model's weights and ``corpus``."""

    content = {"format": CORPUS_FORMAT, "weights": model_hash(adapter), "corpus": vars(corpus),
               "dtype": str(adapter.dtype)}
    key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / f"corpus-{key}.safetensors"
    if path.exists():
        return load_file(str(path))["ids"]
    tokenizer = adapter.tokenizer
    special = set(tokenizer.all_special_ids)
    image_id = getattr(adapter, "image_token_id", None)
    vocab = [i for i in range(len(tokenizer)) if i not in special and i != image_id]
    generator = torch.Generator().manual_seed(corpus.seed)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=corpus.length - 1, min_new_tokens=corpus.length - 1,
                              pad_token_id=adapter.pad_token_id, eos_token_id=None)
    rows = []
    devices = [adapter.device] if adapter.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(corpus.seed)
        for start in range(0, corpus.sequences(), corpus.batch):
            n = min(corpus.batch, corpus.sequences() - start)
            first = torch.tensor(vocab)[torch.randint(len(vocab), (n, 1), generator=generator)]
            out = adapter.model.generate(input_ids=first.to(adapter.device),
                                         attention_mask=torch.ones_like(first).to(adapter.device),
                                         generation_config=config)
            rows.append(out[:, : corpus.length].cpu())
    ids = torch.cat(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"ids": ids.contiguous()}, str(tmp))
    return ids


def corpus_covariances(adapter, layers: Sequence[int], corpus: GenericCorpus,
                       ridge: float = 1e-3) -> dict[int, KeyCovariance]:
    """C for each of ``layers`` from the keys of the model's own sampled text (``corpus``), cached on disk."""
    ids = sample_corpus(adapter, corpus)
    ids_hash = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    result = {}
    for layer in layers:
        content = {"format": FORMAT, "weights": upstream_hash(adapter, layer), "corpus": ids_hash,
                   "dtype": str(adapter.dtype), "layer": int(layer)}
        key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
        path = cache_dir() / f"keycov-corpus-{key}.safetensors"
        loaded = _load(path)
        if loaded is None:
            second, n_keys = _accumulate_ids(adapter, int(layer), ids, corpus.batch)
            _save(path, second, n_keys, int(ids.shape[0]))
            loaded = (second, n_keys, int(ids.shape[0]))
        result[int(layer)] = _finish(int(layer), *loaded, ridge, path)
    return result


@torch.no_grad()
def _accumulate_ids(adapter, layer: int, ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    module = adapter.mlp_out_proj(layer)
    total, count = None, 0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start : start + batch].to(adapter.device)
        with stop_after(module), record_inputs({"key": module}) as store:
            adapter.model(input_ids=chunk, attention_mask=torch.ones_like(chunk))
        keys = store["key"].reshape(-1, store["key"].shape[-1]).to(torch.float64).cpu()
        total = keys.T @ keys if total is None else total + keys.T @ keys
        count += int(keys.shape[0])
    return total / count, count

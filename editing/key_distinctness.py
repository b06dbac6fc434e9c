"""How distinct MultEdit's keys are, per layer and key position, and the spill an edit predicts from that.

An edit at key k_e changes the value of any other key k_u too. For one edit in
the lambda form the change at k_u is delta * (k_e . k_u) / (k_e . k_e + lam);
in the covariance form delta * (C^-1 k_e . k_u) / (C^-1 k_e . k_e). So the
"predicted spill" is the mean |ratio| over (edited question, unrelated
question) pairs: the fraction of the intended change that lands on an unrelated
question's value. Keys that all point the same way (cosine ~1) spill ~1.
"""

from __future__ import annotations

from typing import Sequence

import torch

from editing.methods.base import KEY_POSITIONS, SkipEdit, teacher_forced
from harness.hooks import record_inputs


@torch.no_grad()
def question_keys(adapter, items: Sequence, layers: Sequence[int]) -> dict[str, list[dict | None]]:
    """Per key position, per question: {layer: key} (None where that position does not exist)."""
    modules = {int(l): adapter.mlp_out_proj(int(l)) for l in layers}
    out: dict[str, list] = {position: [] for position in KEY_POSITIONS}
    for item in items:
        question, image, span = item
        prompts = {}
        for position in KEY_POSITIONS:
            try:
                prompts[position] = teacher_forced(adapter, question, image, "x", position, span)
            except SkipEdit:
                prompts[position] = None
        any_prompt = next((p for p in prompts.values() if p is not None), None)
        if any_prompt is None:
            for position in KEY_POSITIONS:
                out[position].append(None)
            continue
        with record_inputs(modules) as store:
            adapter.model(**any_prompt.inputs)
        for position, prompt in prompts.items():
            out[position].append(None if prompt is None else
                                 {l: store[l][0, prompt.key_position].double().cpu() for l in modules})
    return out


def distinctness(edited: list[dict | None], unrelated: list[dict | None], layer: int, lam: float = 1e-2,
                 cov=None) -> dict | None:
    """Mean cosine of edited keys to unrelated keys and the predicted spill (lambda form; covariance with ``cov``)."""
    E = [k[layer] for k in edited if k is not None]
    U = [k[layer] for k in unrelated if k is not None]
    if not E or not U:
        return None
    E, U = torch.stack(E), torch.stack(U)
    cos = torch.nn.functional.normalize(E, dim=1) @ torch.nn.functional.normalize(U, dim=1).T
    norms = E.pow(2).sum(1)
    ridge = lam * float(norms.mean())
    spill = (E @ U.T) / (norms + ridge)[:, None]
    result = {"mean_cosine": round(float(cos.mean()), 4), "predicted_spill": round(float(spill.abs().mean()), 4),
              "n_edited": int(E.shape[0]), "n_unrelated": int(U.shape[0])}
    if cov is not None:
        CE = cov.solve(E.T).T  # rows: C^-1 k_e
        spill_cov = (CE @ U.T) / (CE * E).sum(1)[:, None]
        result["predicted_spill_covariance"] = round(float(spill_cov.abs().mean()), 4)
    return result


def table(edited: dict, unrelated: dict, layers: Sequence[int], lam: float = 1e-2, covs: dict | None = None) -> dict:
    """{position: {layer: distinctness}} from ``question_keys`` of the edited and the unrelated questions."""
    covs = covs or {}
    return {position: {str(l): distinctness(edited[position], unrelated[position], int(l), lam, covs.get(int(l)))
                       for l in layers} for position in KEY_POSITIONS}


def most_distinct_position(table: dict, layer: int) -> tuple[str | None, dict]:
    """The key position with the least predicted spill at ``layer`` (and each position's spill)."""
    spills = {position: rows.get(str(layer)) for position, rows in table.items()}
    spills = {p: r["predicted_spill"] for p, r in spills.items() if r is not None}
    if not spills:
        return None, {}
    return min(spills, key=lambda p: (spills[p], KEY_POSITIONS.index(p))), spills

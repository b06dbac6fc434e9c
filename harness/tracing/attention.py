"""Attention contributions: how much each source token writes into each target token, per layer.

For a Llama-style attention block the output at target position i is

    out_i = sum_j  sum_h  A_h[i, j] * (x_j W_V,h + b_V,h) W_O,h   +  b_O

with x the block's input (the post-input-layernorm hidden states), A_h the
softmax attention of head h, W_V,h the value projection of the key/value head
that head h shares under grouped-query attention, and W_O,h the slice of the
output projection that reads head h. The vector inside the sum over j is the
contribution of source j to target i; its norm is what the analysis reports.

Bias terms. A value bias b_V (Qwen2 has one) is part of every value vector, so
source j carries its attention-weighted share A_h[i, j] * b_V,h W_O,h of it
(these shares add up to b_V W_O because each row of A sums to one). The output
bias b_O does not depend on any source; it is returned separately and
attributed to no token.

A is read exactly from the model: the forward runs with the "eager"
attention implementation (switched on for the duration and restored after),
whose attention blocks return their weights, and the block inputs x are
recorded with ``harness.hooks``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from harness.hooks import record_inputs, record_outputs
from vqa_constraints.errors import UserError


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention (the implementation that returns attention weights)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise UserError(f"{type(model).__name__}: cannot switch to eager attention to read attention weights")
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _projections(attn: nn.Module) -> tuple[nn.Linear, nn.Linear, int, int]:
    """(v_proj, o_proj, head_dim, key/value groups) of a Llama-style attention block."""
    v_proj = getattr(attn, "v_proj", None)
    o_proj = getattr(attn, "o_proj", None)
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(v_proj, nn.Linear) or not isinstance(o_proj, nn.Linear) or head_dim is None:
        raise UserError(
            f"{type(attn).__name__}: attention contributions need a Llama-style block (v_proj, o_proj, head_dim)"
        )
    groups = int(getattr(attn, "num_key_value_groups", 1))
    return v_proj, o_proj, int(head_dim), groups


def contribution_vectors(
    attn: nn.Module, hidden: torch.Tensor, weights: torch.Tensor, targets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-source contribution vectors of one attention block, in float32.

    hidden: the block input for one prompt, [seq, d_model] (or [1, seq, d_model]);
    weights: its attention weights, [heads, seq_q, seq_k] (or with a batch dim of one);
    returns ([len(targets), seq_k, d_model], the output bias or None).
    """
    v_proj, o_proj, head_dim, groups = _projections(attn)
    if hidden.dim() == 3:
        hidden = hidden[0]
    if weights.dim() == 4:
        weights = weights[0]
    x = hidden.float()
    values = nn.functional.linear(x, v_proj.weight.float(), None if v_proj.bias is None else v_proj.bias.float())
    values = values.view(x.shape[0], -1, head_dim)  # [seq, kv_heads, head_dim]
    values = values.repeat_interleave(groups, dim=1)  # the kv head each query head reads (repeat_kv order)
    rows = weights[:, list(targets), :].float()  # [heads, T, seq]
    weighted = torch.einsum("hts,shd->tshd", rows, values)  # [T, seq, heads, head_dim]
    vectors = weighted.reshape(*weighted.shape[:2], -1) @ o_proj.weight.float().T  # [T, seq, d_model]
    bias = None if o_proj.bias is None else o_proj.bias.float()
    return vectors, bias


@dataclass
class ContributionRun:
    """What one eager forward of one prompt gives: contribution norms and next-token distributions."""

    norms: torch.Tensor  # [layers, targets, seq]: ||c_ij|| per layer
    group_norms: dict[str, torch.Tensor]  # name -> [layers, targets]: ||sum_{j in group} c_ij||
    probs: torch.Tensor  # [len(read_positions), vocab]: next-token probabilities at each read position
    targets: list[int]
    read_positions: list[int]


@torch.no_grad()
def run_contributions(
    model: nn.Module,
    attention_blocks: Sequence[nn.Module],
    inputs: dict[str, torch.Tensor],
    targets: Sequence[int],
    source_groups: dict[str, Sequence[int]] | None = None,
    read_positions: Sequence[int] | None = None,
) -> ContributionRun:
    """One forward of ``model(**inputs)`` reading every block's contributions to ``targets``.

    ``source_groups`` names sets of source positions whose summed contribution
    vector is also reported (e.g. all constraint tokens -> the read position).
    ``read_positions``: where next-token probabilities are returned (default: the last position).
    """
    source_groups = source_groups or {}
    length = int(inputs["input_ids"].shape[-1])
    read_positions = [length - 1] if read_positions is None else [int(q) for q in read_positions]
    names = {f"L{index}": block for index, block in enumerate(attention_blocks)}
    with eager_attention(model), record_inputs(names) as xs, record_outputs(names, index=1) as ws:
        logits = model(**inputs, use_cache=False).logits
    norms, group_norms = [], {name: [] for name in source_groups}
    for name, block in names.items():
        if ws.get(name) is None:
            raise UserError(f"{type(block).__name__}: the attention block returned no weights under eager attention")
        vectors, _ = contribution_vectors(block, xs[name], ws[name], targets)
        norms.append(vectors.norm(dim=-1))
        for group, positions in source_groups.items():
            group_norms[group].append(vectors[:, list(positions), :].sum(dim=1).norm(dim=-1))
        del vectors
    probs = torch.softmax(logits[0, read_positions].float(), dim=-1)
    return ContributionRun(
        norms=torch.stack(norms).cpu(),
        group_norms={g: torch.stack(v).cpu() for g, v in group_norms.items()},
        probs=probs.cpu(),
        targets=list(targets),
        read_positions=read_positions,
    )


# --- one question ---------------------------------------------------------------


@dataclass
class QuestionContributions:
    """The contributions the study reports for one question (arrays are numpy, layers first).

    A *read position* is a token whose next-token distribution is read: the one that predicts the
    scored token (after any teacher-forced prefix of the model's own words), not necessarily the
    prompt's last token.
    """

    image_positions: list[int]
    visual_positions: list[int]  # tokens of the visual constraint(s)
    constraint_positions: list[int]  # tokens of every constraint (visual and textual)
    prompt_last: int  # the prompt's last token
    read_positions: list[int]
    image_to_visual: "np.ndarray"  # [layers, image tokens]: mean over visual-constraint tokens of ||c_ij||
    image_to_visual_total: "np.ndarray"  # [layers]: mean over visual-constraint tokens of ||sum_{j in image} c_ij||
    image_to_read: "np.ndarray"  # [layers, read positions, image tokens]: ||c_read,j||
    constraint_to_read: "np.ndarray"  # [layers, read positions]: ||sum_{j in constraints} c_read,j||
    probs: torch.Tensor  # [read positions, vocab]


def constraint_positions(encoded, constraints) -> list[int]:
    """Sorted token positions covering ``constraints`` (UserError when one maps to no token)."""
    positions: set[int] = set()
    for constraint in constraints:
        positions.update(encoded.positions_for_question_span(constraint.char_start, constraint.char_end))
    return sorted(positions)


def prompt_last_position(encoded) -> int:
    """The prompt's last token (the one before the first teacher-forced token, if any)."""
    return encoded.answer_positions[0] - 1 if encoded.answer_positions else encoded.length - 1


def question_contributions(adapter, record, encoded=None, read_positions: Sequence[int] | None = None
                           ) -> QuestionContributions:
    """Contributions for one record: image -> visual constraint, constraint -> each read position.

    ``encoded``: the prompt, possibly with teacher-forced words after it (``adapter.encode(..., answer=...)``;
    the prompt's token spans are the same either way); ``read_positions`` default to the prompt's last token.
    Raises UserError when a constraint maps to no token or the record has no visual constraint or the
    prompt has no image tokens.
    """
    encoded = encoded if encoded is not None else adapter.encode(record.question, record.image)
    visual = constraint_positions(encoded, record.visual_constraints)
    if not visual:
        raise UserError(f"record {record.id}: no visual constraint to analyse")
    every = constraint_positions(encoded, record.constraints)
    images = list(encoded.image_positions)
    if not images:
        raise UserError(f"record {record.id}: the prompt has no image tokens")
    last = prompt_last_position(encoded)
    reads = [last] if read_positions is None else [int(q) for q in read_positions]
    blocks = [adapter.attention(l) for l in range(adapter.num_layers)]
    run = run_contributions(
        adapter.model, blocks, encoded.inputs, targets=visual + reads,
        source_groups={"constraints": every, "image": images}, read_positions=reads,
    )
    nv = len(visual)
    return QuestionContributions(
        image_positions=images,
        visual_positions=visual,
        constraint_positions=every,
        prompt_last=last,
        read_positions=reads,
        image_to_visual=run.norms[:, :nv, images].mean(dim=1).numpy(),
        image_to_visual_total=run.group_norms["image"][:, :nv].mean(dim=1).numpy(),
        image_to_read=run.norms[:, nv:][:, :, images].numpy(),
        constraint_to_read=run.group_norms["constraints"][:, nv:].numpy(),
        probs=run.probs,
    )

"""What every edit method shares: the interface, the reversible handle, and the
teacher-forced inputs the methods optimise.

A method is ``apply(adapter, requests, layers) -> EditHandle``: it changes the
weights of the loaded model in memory and returns a handle whose ``restore()``
puts back the exact original tensors (bit for bit; tests compare hashes).
Nothing here writes to disk.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from editing.requests import EditRequest
from vqa_constraints.errors import UserError

KEY_POSITIONS = ("constraint", "last")


class SkipEdit(Exception):
    """A request this method cannot edit (counted in the results as a skip, never a crash)."""


@dataclass
class EditHandle:
    """The original values of every tensor an edit changed."""

    saved: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # method-specific facts (steps, losses, norms) for edits.jsonl
    restored: bool = False

    @classmethod
    def snapshot(cls, params: Sequence[nn.Parameter]) -> "EditHandle":
        return cls(saved=[(p, p.detach().clone()) for p in params])

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in self.saved:
            param.copy_(original)
        self.restored = True


class EditMethod:
    """One way of editing; subclasses set ``name`` and implement ``apply``."""

    name = "base"

    def apply(self, adapter, requests: Sequence[EditRequest], layers: Sequence[int]) -> EditHandle:
        raise NotImplementedError

    def config(self) -> dict:
        """Hyper-parameters, recorded in the results."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# --- checks ------------------------------------------------------------------


def check_layers(adapter, layers: Sequence[int]) -> list[nn.Linear]:
    """The output projections of ``layers``; UserError for no layers, a bad index or no recognised projection."""
    if not layers:
        raise UserError("no layers to edit: pass --layers")
    count = adapter.num_layers
    for layer in layers:
        if not 0 <= int(layer) < count:
            raise UserError(f"layer {layer} is out of range: the model has {count} layers (0..{count - 1})")
    return [adapter.mlp_out_proj(int(layer)) for layer in layers]


def check_inputs(adapter, requests: Sequence[EditRequest], layers: Sequence[int]) -> list[nn.Linear]:
    """``check_layers``, and UserError for an empty request list."""
    if not requests:
        raise UserError("no edit requests: nothing to edit (check --track, --limit and the data)")
    return check_layers(adapter, layers)


def weights_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, raw bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def only_trainable(model: nn.Module, params: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """Turn gradients off for every parameter except ``params`` (flags restored afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


# --- teacher-forced inputs -----------------------------------------------------


@dataclass
class TeacherForced:
    """One prompt with the target answer appended."""

    inputs: dict[str, torch.Tensor]
    answer_start: int  # first answer token; logits at [answer_start-1, end-1) predict the answer
    answer_end: int
    key_position: int  # where the edited key is read

    def nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens (logits of this single row)."""
        log_probs = torch.log_softmax(logits[0, self.answer_start - 1 : self.answer_end - 1].float(), dim=-1)
        targets = self.inputs["input_ids"][0, self.answer_start : self.answer_end].to(log_probs.device)
        return -log_probs.gather(-1, targets[:, None]).mean()


def _to_model(inputs: dict, adapter) -> dict:
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(adapter.device)
            if value.is_floating_point():
                value = value.to(adapter.dtype)
        out[key] = value
    return out


def teacher_forced(adapter, question: str, image, target: str, key_position: str = "last",
                   key_span: tuple[int, int] | None = None) -> TeacherForced:
    """Inputs for ``question`` (+image) followed by ``target``, and the key position.

    ``key_position="constraint"`` reads the key at the last token of the visual
    constraint (the paper's choice); ``"last"`` at the final prompt token.
    """
    if key_position not in KEY_POSITIONS:
        raise UserError(f"unknown key position {key_position!r}; choose from {', '.join(KEY_POSITIONS)}")
    prompt = adapter.encode(question, image)
    full = adapter.encode(question, image, answer=target)
    n_prompt = prompt.length
    prompt_ids = prompt.input_ids[0]
    if full.length <= n_prompt or not torch.equal(full.input_ids[0, :n_prompt], prompt_ids):
        # The tokenizer merged across the prompt/answer boundary: score the answer's own tokens at the end.
        n_answer = len(adapter.answer_token_ids(target))
        start = full.length - n_answer
    else:
        start = n_prompt
    if start < 1 or start >= full.length:
        raise SkipEdit(f"target {target!r} has no tokens after the prompt")
    if key_position == "last":
        position = start - 1
    else:
        if key_span is None:
            raise SkipEdit("the question has no visual constraint to read the key at (use --key-position last)")
        try:
            position = full.positions_for_question_span(*key_span)[-1]
        except UserError as error:
            raise SkipEdit(str(error)) from None
    return TeacherForced(_to_model(full.inputs, adapter), start, full.length, position)


def request_prompts(adapter, request: EditRequest, key_position: str) -> list[TeacherForced]:
    """The teacher-forced inputs an edit optimises: the edited question with its own image."""
    return [teacher_forced(adapter, request.question, request.image, request.target, key_position, request.key_span)]


def target_loss(adapter, prompts: Sequence[TeacherForced]) -> torch.Tensor:
    """Mean answer NLL over ``prompts`` (one forward each, so no padding logic is needed)."""
    losses = [p.nll(adapter.model(**p.inputs).logits) for p in prompts]
    return torch.stack(losses).mean()

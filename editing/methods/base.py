"""What every edit method shares: the interface, the reversible handle, and the
teacher-forced inputs the methods optimise.

A method is ``apply(adapter, requests, layers) -> EditHandle``: it changes the
weights of the loaded model in memory and returns a handle whose ``restore()``
puts back the exact original tensors (bit for bit; tests compare hashes).
Nothing here writes to disk.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from editing.requests import EditRequest
from harness.hooks import edit_inputs, edit_outputs
from vqa_constraints.errors import UserError

KEY_POSITIONS = ("subject-token", "constraint", "last")


class SkipEdit(Exception):
    """A request this method cannot edit (counted in the results as a skip, never a crash)."""


@dataclass
class EditHandle:
    """The edited projections, each running on an fp32 master copy until ``restore()``.

    A bf16 matrix cannot hold a small update: most entries of W0 + delta round
    back to W0. So the edit never writes into the original tensor: the module
    gets an fp32 copy of its weight (inputs cast up, output cast back to the
    model's dtype), methods change that copy, and ``restore()`` puts the
    untouched original Parameter back (bit-exact by construction).
    """

    modules: list[tuple[nn.Module, dict[str, nn.Parameter], ExitStack]] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # method-specific facts (steps, losses, norms) for edits.jsonl
    restored: bool = False

    @classmethod
    def master_copies(cls, modules: Sequence[nn.Module]) -> "EditHandle":
        handle = cls()
        try:
            for module in modules:
                handle.modules.append(_promote(module))
        except Exception:
            handle.restore()
            raise
        return handle

    @property
    def weights(self) -> list[nn.Parameter]:
        """The fp32 master weights the method edits."""
        return [module.weight for module, _, _ in self.modules]

    @torch.no_grad()
    def restore(self) -> None:
        for module, originals, hooks in self.modules:
            hooks.close()
            for name, param in originals.items():
                setattr(module, name, param)
        self.modules = []
        self.restored = True


def _promote(module: nn.Module) -> tuple[nn.Module, dict[str, nn.Parameter], ExitStack]:
    originals = {name: getattr(module, name) for name in ("weight", "bias") if getattr(module, name, None) is not None}
    dtype = originals["weight"].dtype
    for name, param in originals.items():
        setattr(module, name, nn.Parameter(param.detach().to(torch.float32, copy=True), requires_grad=False))
    # The hooks live as long as the edit, not one block: an open stack that restore() closes.
    hooks = ExitStack()
    hooks.enter_context(edit_inputs({module: lambda inputs: inputs.to(torch.float32)}))
    hooks.enter_context(edit_outputs({module: lambda output: output.to(dtype)}))
    return module, originals, hooks


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


def weights_hash(*modules: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``modules`` (names, dtypes, shapes, raw bytes).

    Restore checks pass only the edited projections: hashing a whole 7B model
    (14 GB) per method would cost more than the edits.
    """
    digest = hashlib.sha256()
    items = [(f"{i}.{name}", t) for i, module in enumerate(modules) for name, t in module.state_dict().items()]
    for name, tensor in sorted(items, key=lambda item: item[0]):
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
    answer_start: int  # first scored token; logits at [answer_start-1, end-1) predict the answer
    answer_end: int
    key_position: int  # where the edited key is read
    encoded: object = None  # the adapter's Encoded, for batching several prompts

    def nll(self, logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Mean negative log-likelihood of the answer tokens (logits of this single row; ``offset``:
        positions cut from the front of ``logits``)."""
        first, last = self.answer_start - 1 - offset, self.answer_end - 1 - offset
        log_probs = torch.log_softmax(logits[0, first:last].float(), dim=-1)
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
                   key_span: tuple[int, int] | None = None, prefix: str = "") -> TeacherForced:
    """Inputs for ``question`` (+image) followed by ``prefix`` and ``target``, and the key position.

    ``prefix`` is the model's own answer up to where its answer entity starts
    ("The capital of Nepal is"): it is forced but not scored, so the loss asks
    for the new entity in the model's format, not for a new format.
    Key positions: ``last`` is the final prompt token; ``constraint`` the last
    token of the visual constraint (the paper's choice); ``subject-token`` the
    last image token (the subject is pictured, not named; ROME keys on the
    subject's last token).
    """
    if key_position not in KEY_POSITIONS:
        raise UserError(f"unknown key position {key_position!r}; choose from {', '.join(KEY_POSITIONS)}")
    answer = f"{prefix} {target}" if prefix else target
    prompt = adapter.encode(question, image)
    full = adapter.encode(question, image, answer=answer)
    n_prompt = prompt.length
    if full.answer_positions and full.answer_start is not None and torch.equal(
            full.input_ids[0, :n_prompt], prompt.input_ids[0]):
        entity_char = full.answer_start + (len(prefix) if prefix else 0)
        # Score the tokens that end past the prefix (the entity's first token may carry the separating space).
        scored = [i for i in full.answer_positions if full.token_char_spans[i][1] > entity_char]
        start = scored[0] if scored else full.length
    else:
        # The tokenizer merged across the prompt/answer boundary: score the target's own tokens at the end.
        start = full.length - len(adapter.answer_token_ids(target))
        n_prompt = min(n_prompt, start)
    end = (full.answer_positions[-1] + 1) if full.answer_positions else full.length
    if start < 1 or start >= end:
        raise SkipEdit(f"target {target!r} has no tokens after the prompt")
    if key_position == "last":
        position = n_prompt - 1
    elif key_position == "subject-token":
        if not full.image_positions:
            raise SkipEdit("the prompt has no image token to read the key at (use --key-position last)")
        position = full.image_positions[-1]
    else:
        if key_span is None:
            raise SkipEdit("the question has no visual constraint to read the key at (use --key-position last)")
        try:
            position = full.positions_for_question_span(*key_span)[-1]
        except UserError as error:
            raise SkipEdit(str(error)) from None
    return TeacherForced(_to_model(full.inputs, adapter), start, end, position, full)


def request_prompts(adapter, request: EditRequest, key_position: str) -> list[TeacherForced]:
    """The teacher-forced inputs an edit optimises: the edited question with its own image, the
    target after the request's answer prefix (the model's own format)."""
    return [teacher_forced(adapter, request.question, request.image, request.target, key_position,
                           request.key_span, request.prefix)]


def target_loss(adapter, prompts: Sequence[TeacherForced]) -> torch.Tensor:
    """Mean answer NLL over ``prompts`` (one forward each, so no padding logic is needed)."""
    losses = [p.nll(adapter.model(**p.inputs).logits) for p in prompts]
    return torch.stack(losses).mean()

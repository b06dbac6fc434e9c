"""Read or rewrite what named modules compute during a forward pass.

The one hooking utility the project has: tracing restores clean activations
with it, attention analysis and editing read MLP keys with it. Every helper is
a context manager, so hooks never outlive the block that needs them.

Module outputs may be a tensor or a tuple whose first element is the tensor
(decoder layers and attention blocks in some transformers versions); the
helpers hand ``fn`` the tensor and put the result back in the same shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

TensorFn = Callable[[torch.Tensor], torch.Tensor | None]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _element(output, index: int):
    if index == 0:
        return _first(output)
    return output[index] if isinstance(output, tuple) and len(output) > index else None


def _first_input(args, kwargs):
    """The module's first positional input, or its ``hidden_states`` keyword (decoder layers call
    attention blocks with keywords only), or else its first tensor keyword."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _replace_first(output, tensor):
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    return tensor


@contextmanager
def _removed_on_exit(handles: list) -> Iterator[None]:
    """Remove the hooks when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_outputs(
    modules: dict[str, nn.Module], detach: bool = True, index: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the (last) output tensor of each named module: ``{name: tensor}``.

    ``index`` picks another element of a tuple output (e.g. 1: an eager
    attention block's attention weights); a missing element is stored as None.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_module, _inputs, output, name=name):
            tensor = _element(output, index)
            store[name] = tensor.detach() if detach and tensor is not None else tensor
        handles.append(module.register_forward_hook(hook))
    with _removed_on_exit(handles):
        yield store


@contextmanager
def record_inputs(modules: dict[str, nn.Module], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the first input of each named module (e.g. an MLP down-projection's key, or the
    normalised hidden states an attention block receives as its ``hidden_states`` keyword)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_module, inputs, kwargs, name=name):
            tensor = _first_input(inputs, kwargs)
            store[name] = tensor.detach() if detach and tensor is not None else tensor
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with _removed_on_exit(handles):
        yield store


@contextmanager
def edit_outputs(edits: dict[nn.Module, TensorFn]) -> Iterator[None]:
    """Rewrite each module's output tensor with ``fn(tensor)`` (returning None keeps it, if changed in place)."""
    handles = []
    for module, fn in edits.items():
        def hook(_module, _inputs, output, fn=fn):
            tensor = _first(output)
            new = fn(tensor)
            return _replace_first(output, tensor if new is None else new)
        handles.append(module.register_forward_hook(hook))
    with _removed_on_exit(handles):
        yield


@contextmanager
def edit_inputs(edits: dict[nn.Module, TensorFn]) -> Iterator[None]:
    """Rewrite each module's first positional input with ``fn(tensor)`` before it runs."""
    handles = []
    for module, fn in edits.items():
        def hook(_module, inputs, fn=fn):
            new = fn(inputs[0])
            if new is None:
                return None
            return (new,) + tuple(inputs[1:])
        handles.append(module.register_forward_pre_hook(hook))
    with _removed_on_exit(handles):
        yield


class _Stop(Exception):
    """Raised by :func:`stop_after`'s hook and swallowed by its block; never seen outside."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End a forward pass inside the block right after ``module`` has run: what comes later (the rest of
    the layers, the logits) is not needed when only what a module reads or writes is recorded."""
    def hook(_module, _inputs, _output):
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _Stop:
        pass
    finally:
        handle.remove()


KwargsFn = Callable[[dict], dict | None]


@contextmanager
def edit_kwargs(edits: dict[nn.Module, KwargsFn]) -> Iterator[None]:
    """Rewrite the keyword arguments a module is called with: ``fn(kwargs)`` returns the new
    dict (or None to keep them). Attention knockout edits an attention block's ``attention_mask``."""
    handles = []
    for module, fn in edits.items():
        def hook(_module, args, kwargs, fn=fn):
            new = fn(dict(kwargs))
            return None if new is None else (args, new)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with _removed_on_exit(handles):
        yield

"""Edit methods, one module each, all behind ``EditMethod.apply(adapter, requests, layers)``, and the registry
`edit --method NAME` reads. A new method: ``register_method`` (docs/extending.md)."""

from __future__ import annotations

import dataclasses

from editing.methods.base import EditHandle, EditMethod, SkipEdit, weights_hash
from editing.methods.ft import FineTune
from editing.methods.ft_l import ConstrainedFineTune
from editing.methods.multedit import MemitLeastSquares, MultEdit, MultEditCovariance
from vqa_constraints.errors import UserError

METHODS: dict[str, type[EditMethod]] = {}


def register_method(method: type[EditMethod]) -> type[EditMethod]:
    """Make ``method`` (a dataclass subclass of ``EditMethod``) available as `edit --method NAME`, its fields as
    the hyper-parameters `--method-config FILE.yaml` may set (usable as a class decorator)."""
    if not (isinstance(method, type) and issubclass(method, EditMethod) and dataclasses.is_dataclass(method)):
        raise ValueError(f"{method!r}: an edit method is a dataclass subclass of EditMethod")
    if method.name in ("", EditMethod.name) or METHODS.get(method.name, method) is not method:
        raise ValueError(f"{method.__name__}: set a name of its own (taken: {', '.join(METHODS)})")
    METHODS[method.name] = method
    return method


for _method in (MultEdit, MultEditCovariance, FineTune, ConstrainedFineTune, MemitLeastSquares):
    register_method(_method)

# MultEdit's variants (compared against the baselines in editing_results.json's ``comparisons``).
MULTEDIT_VARIANTS = ("multedit", "multedit-cov")
BASELINES = ("ft", "ft-l", "memit-ls")


def make_method(name: str, **options) -> EditMethod:
    """A method by its CLI name; ``options`` that the method does not take are ignored."""

    if name not in METHODS:
        raise UserError(f"unknown edit method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields})


__all__ = ["EditHandle", "EditMethod", "SkipEdit", "METHODS", "MULTEDIT_VARIANTS", "BASELINES", "make_method",
           "register_method", "weights_hash"]

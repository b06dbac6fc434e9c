"""Edit methods, one module each, all behind ``EditMethod.apply(adapter, requests, layers)``."""

from __future__ import annotations

from editing.methods.base import EditHandle, EditMethod, SkipEdit, weights_hash
from editing.methods.ft import FineTune
from editing.methods.ft_l import ConstrainedFineTune
from editing.methods.multedit import MemitLeastSquares, MultEdit, MultEditCovariance
from vqa_constraints.errors import UserError

METHODS: dict[str, type[EditMethod]] = {
    "multedit": MultEdit,
    "multedit-cov": MultEditCovariance,
    "ft": FineTune,
    "ft-l": ConstrainedFineTune,
    "memit-ls": MemitLeastSquares,
}
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


__all__ = ["EditHandle", "EditMethod", "SkipEdit", "METHODS", "MULTEDIT_VARIANTS", "BASELINES", "make_method", "weights_hash"]

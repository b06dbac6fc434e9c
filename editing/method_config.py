"""``--method-config FILE.yaml``: hyper-parameters per method, as ROME and EasyEdit keep them per model.

    ft-l:
      linf_rms: 0.1        # a number fixes it
    multedit:
      lam: auto            # tuned on the validation split (editing.runner.GRIDS)

Every method and field is checked before the model loads; a bad file is one UserError naming it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from editing.methods import METHODS
from vqa_constraints.errors import UserError


def load_method_config(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"--method-config {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--method-config {path}:{where}: not valid YAML") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise UserError(f"--method-config {path}: expected a mapping of method name -> hyper-parameters")
    out = {}
    for name, params in document.items():
        if name not in METHODS:
            raise UserError(f"--method-config {path}: unknown method {name!r}; choose from {', '.join(METHODS)}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise UserError(f"--method-config {path}: {name}: expected a mapping of hyper-parameters")
        fields = METHODS[name].__dataclass_fields__
        for key, value in params.items():
            if key not in fields or key == "key_position":
                allowed = ", ".join(f for f in fields if f != "key_position")
                raise UserError(f"--method-config {path}: {name}.{key}: unknown hyper-parameter; choose from {allowed}")
            if not (value is None or value == "auto" or isinstance(value, (bool, int, float, str))):
                raise UserError(f"--method-config {path}: {name}.{key}: expected a number, a word or 'auto'")
        out[str(name)] = dict(params)
    return out

"""FT-L: fine-tuning with an L-infinity bound on the weight change (ROME's constrained fine-tuning baseline).

ε = 5e-4, absolute, per weight: the ``norm_constraint`` of ROME's FT-L
hyper-parameters (kmeng01/rome, hparams/FT, GPT-2 XL; EasyEdit's FT configs use
the same value). Whether the bound ever clipped a step is recorded per edit.
"""

from __future__ import annotations

from dataclasses import dataclass

from editing.methods.ft import FineTune


@dataclass
class ConstrainedFineTune(FineTune):
    linf: float | None = 5e-4  # |W - W0| <= linf for every weight

    name = "ft-l"

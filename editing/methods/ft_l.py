"""FT-L: fine-tuning with an L-infinity bound on the weight change (constrained fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass

from editing.methods.ft import FineTune


@dataclass
class ConstrainedFineTune(FineTune):
    linf: float | None = 0.05  # |W - W0| <= linf * RMS(W0) for every weight

    name = "ft-l"

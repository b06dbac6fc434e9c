"""FT-L: fine-tuning with an L-infinity bound on the weight change (ROME's constrained fine-tuning baseline).

ROME's FT-L bound (``norm_constraint`` 5e-4, absolute) was set for GPT-2 XL's
weights; copied to a model with other weight scales it either never binds or
stops every edit. Here the bound is relative to the edited matrix's weight RMS
(``linf_rms``): ε = linf_rms · RMS(W0). `vqa-constraints edit` tunes linf_rms
on the validation split's requests (``editing.tuning``) unless the method
config fixes it; ``linf`` sets an absolute bound instead. Whether the bound ever
clipped a step is recorded per edit.
"""

from __future__ import annotations

from dataclasses import dataclass

from editing.methods.ft import FineTune

# Used when nothing tuned or fixed linf_rms (a method built directly, outside `edit`).
DEFAULT_LINF_RMS = 0.1


@dataclass
class ConstrainedFineTune(FineTune):
    linf: float | None = None  # |W - W0| <= linf for every weight (absolute; overrides linf_rms)
    linf_rms: float | None = DEFAULT_LINF_RMS  # |W - W0| <= linf_rms * RMS(W0)

    name = "ft-l"

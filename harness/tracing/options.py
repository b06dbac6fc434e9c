"""What a trace is asked to do: ``TraceOptions``, checked before any data or model loads, and the values its
fields take. Light on purpose: `trace`'s parser reads these without loading the engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.scoring import DEFAULT_MAX_NEW_TOKENS
from harness.shards import parse_shard
from harness.tracing.corruptions import CORRUPTIONS, DEFAULT_REPLACE_TOKEN
from harness.tracing.patching import KINDS
from harness.tracing.targets import TARGETS
from vqa_constraints.errors import UserError

ENGINE_NAMES = ("fast", "reference")  # causal_trace.ENGINES maps each to its class


ANSWER_SCORES = ("first-token", "full")


POSITIONS = ("constraint", "last", "all")


TRACED = ("correct", "all")


PREFIX_SUBJECT = ("corrupt", "keep")


@dataclass
class TraceOptions:
    model: str
    data: str
    config: str
    out: Path
    split: str = "test"
    corruption: str = "replace"
    replace_token: str = DEFAULT_REPLACE_TOKEN
    kinds: tuple[str, ...] = KINDS
    window: int | str | dict = 1  # every kind; "rome" (scaled to depth, see windows_by_kind); or kind -> window
    prefix_subject: str = "corrupt"  # corrupt: the forced prefix's subject tokens with the constraint | keep (leaks)
    positions: str = "constraint"  # constraint (+ last token) | last | all (every text position)
    answer: str = "first-token"  # with target first-token: p of the model's first token | full: of its whole answer
    target: str = "answer"  # answer: the gold answer's tokens where it begins in the model's output | first-token
    min_affected: int = 5  # fewer affected questions than this: a group's curve, peak and causal layers are null
    limit: int | None = None
    text_only: bool = False
    engine: str = "fast"
    seed: int = 0
    noise_samples: int = 5
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # accelerate placement for a model that does not fit one GPU
    max_pixels: int | None = None  # image pixel budget (dynamic-resolution families)
    revision: str | None = None
    trust_remote_code: bool = False
    shard: str | None = None  # "I/N": trace slice I of N of the question list; combine with `merge`
    threshold: float = 0.1  # a layer is causal when its mean normalised effect exceeds this
    bootstrap: int = 1000
    max_batch: int = 64
    cache_budget: int | None = None  # bytes of expanded cache per fast-engine batch (None: from the device)
    progress: bool = True
    traced: str = "correct"  # correct: only questions answered right (the paper) | all: every question, its own top answer
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the greedy answer the target is found in (sentences need more)

    def check(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise UserError(f"--corruption {self.corruption!r}: choose from {', '.join(CORRUPTIONS)}")
        if self.traced not in TRACED:
            raise UserError(f"--traced {self.traced!r}: choose from {', '.join(TRACED)}")
        if self.target not in TARGETS:
            raise UserError(f"--target {self.target!r}: choose from {', '.join(TARGETS)}")
        if self.min_affected < 1:
            raise UserError(f"--min-affected {self.min_affected}: must be at least 1")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.answer not in ANSWER_SCORES:
            raise UserError(f"--answer {self.answer!r}: choose from {', '.join(ANSWER_SCORES)}")
        if self.positions not in POSITIONS:
            raise UserError(f"--positions {self.positions!r}: choose from {', '.join(POSITIONS)}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise UserError(f"--kinds {','.join(self.kinds)!r}: choose from {', '.join(KINDS)}")
        if self.engine not in ENGINE_NAMES:
            raise UserError(f"--engine {self.engine!r}: choose from {', '.join(ENGINE_NAMES)}")
        self.window = parse_window(self.window)
        values = self.window.values() if isinstance(self.window, dict) else ([] if self.window == "rome" else [self.window])
        if any(value < 1 for value in values):
            raise UserError(f"--window {self.window}: must be at least 1")
        if self.prefix_subject not in PREFIX_SUBJECT:
            raise UserError(f"--prefix-subject {self.prefix_subject!r}: choose from {', '.join(PREFIX_SUBJECT)}")
        if self.noise_samples < 1:
            raise UserError(f"--noise-samples {self.noise_samples}: must be at least 1")
        if self.text_only and CORRUPTIONS[self.corruption].corrupts_image:
            raise UserError(f"--corruption {self.corruption} corrupts the image: it cannot be combined with --text-only")
        parse_shard(self.shard)  # a malformed --shard fails before the model loads


def windows_by_kind(window, num_layers: int) -> dict[str, int]:
    """kind -> restoration window. ``window``: an int (every kind), ``"rome"`` (1 for hidden states; for MLP
    and attention ROME's 10 layers of GPT-2 XL's 48, scaled to this model's depth) or a mapping."""
    if window == "rome":
        scaled = max(1, round(10 * num_layers / 48))
        return {"hidden": 1, "mlp": scaled, "attn": scaled}
    if isinstance(window, dict):
        return {kind: int(window.get(kind, 1)) for kind in KINDS}
    return {kind: int(window) for kind in KINDS}


def parse_window(text) -> int | str | dict:
    """``--window``: ``5``, ``rome``, or per kind ``hidden=1,mlp=5,attn=5`` (kinds not named: 1)."""
    if isinstance(text, (int, dict)) or text == "rome":
        return text
    text = str(text).strip()
    try:
        if "=" not in text:
            return int(text)
        window = {}
        for part in text.split(","):
            kind, _, value = part.partition("=")
            if kind.strip() not in KINDS:
                raise ValueError
            window[kind.strip()] = int(value)
        return window
    except ValueError:
        raise UserError(f"--window {text!r}: give a number, 'rome', or per kind e.g. 'hidden=1,mlp=5,attn=5'") from None

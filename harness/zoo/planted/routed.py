"""Ground-truth controls for the attention study, built like the planted model (``harness.zoo.planted``).

Finding 2 (image -> visual-constraint tokens early, then constraint -> answer):

* positive, ``planted-routed``: the planted recipe trained under a per-layer attention mask (training only):
  text tokens after the image may not attend to the image tokens, except the visual-constraint tokens
  ("the creature in this image"), and those only in layers before the planted layer K. The answer can only
  travel image -> constraint tokens (layers < K) -> answer position. The saved model is a stock
  LlavaForConditionalGeneration; ``zoo_accuracy.json`` records its accuracy run without any mask.
* null: ``planted`` itself (its answer position reads the image directly).

The mask is written into each attention block's additive mask by a pre-hook (``harness.hooks.edit_kwargs``),
as the knockout does, so it can differ per layer; the blocks run eagerly while training.

Recipes are separate dataclasses holding a ``PlantedRecipe`` (so the default planted model's cache key is
unchanged) and are cached under their own zoo names.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from harness.hooks import edit_kwargs
from harness.tracing.attention import eager_attention
from harness.tracing.knockout import _additive_mask
from harness.zoo.cache import cached_build
from harness.zoo.planted import recipe as planted
from harness.zoo.planted.build import build_into
from vqa_constraints.sources.planted_world import VISUAL_PHRASE

ROUTED = "planted-routed"


@dataclass(frozen=True)
class RoutedRecipe:
    base: planted.PlantedRecipe = planted.DEFAULT_RECIPE
    # layers (0 .. open_layers-1) where the visual-constraint tokens may read the image; None: the planted layer K
    open_layers: int | None = None

    def route(self) -> "RouteMask":
        """The route this recipe trains under (and the finding-2 control enforces at inference)."""
        return RouteMask(self.base.planted_layer if self.open_layers is None else self.open_layers)


DEFAULT_ROUTED = RoutedRecipe()
# `--quick` and the tests: the planted smoke network (2 layers, K = 1), a few steps.
QUICK_ROUTED = RoutedRecipe(base=planted.QUICK_RECIPE)


class RouteMask:
    """The route of ``RoutedRecipe`` as ``harness.zoo.planted.train.Route``: per-layer masks for the batch being
    trained, set before each forward."""

    label = "routed"

    def __init__(self, open_layers: int):
        self.open_layers = open_layers
        self.phrase: list[int] = []
        self.image_token: int | None = None
        self.image = self.after = self.visual = None  # [B, S] position classes of the current sequence

    def prepare(self, tokenizer) -> None:
        self.phrase = tokenizer(VISUAL_PHRASE, add_special_tokens=False)["input_ids"]

    @contextmanager
    def context(self, model):
        self.image_token = model.config.image_token_id
        blocks = [layer.self_attn for layer in model.model.language_model.layers]
        with eager_attention(model), edit_kwargs({block: self.editor(l) for l, block in enumerate(blocks)}):
            yield

    def before_forward(self, batch: dict) -> None:
        self.set(batch["input_ids"])

    def stats(self) -> dict:
        return {"open_layers": self.open_layers}

    def set(self, input_ids: torch.Tensor) -> None:
        """Classify the positions of ``input_ids`` (the whole sequence: a training batch or a prompt)."""
        ids = input_ids.tolist()
        batch, seq = input_ids.shape
        self.image = (input_ids == self.image_token).cpu()  # [B, S] keys the route guards
        self.after = torch.zeros(batch, seq, dtype=torch.bool)  # text queries after the image
        self.visual = torch.zeros(batch, seq, dtype=torch.bool)  # the visual-constraint phrase
        n = len(self.phrase)
        for row, tokens in enumerate(ids):
            where = [i for i, t in enumerate(tokens) if t == self.image_token]
            if where:
                self.after[row, where[-1] + 1:] = True
            for i in range(seq - n + 1):
                if tokens[i : i + n] == self.phrase:
                    self.visual[row, i : i + n] = True

    @staticmethod
    def padded(classes: torch.Tensor, keys: int, generated: bool) -> torch.Tensor:
        """[B, keys]: a position class over ``keys`` positions; positions past the classified sequence (generated
        tokens) get ``generated``."""
        extra = max(0, keys - classes.shape[1])
        return torch.nn.functional.pad(classes, (0, extra), value=generated)[:, :keys]

    def cut(self, layer: int, queries: int, keys: int) -> torch.Tensor:
        """[B, queries, keys]: True where the route forbids the read. The queries are the last ``queries`` of
        ``keys`` positions; positions past the classified sequence (generated tokens) are text after the image."""
        image = self.padded(self.image, keys, False)
        after = self.padded(self.after, keys, True)[:, keys - queries :]
        visual = self.padded(self.visual, keys, False)[:, keys - queries :]
        closed = after[:, :, None] & image[:, None, :]
        return closed & ~visual[:, :, None] if layer < self.open_layers else closed

    def editor(self, layer: int):
        def edit(kwargs: dict) -> dict:
            mask = _additive_mask(kwargs.get("attention_mask"), kwargs["hidden_states"])
            cut = self.cut(layer, mask.shape[-2], mask.shape[-1])
            kwargs["attention_mask"] = mask.masked_fill(cut[:, None].to(mask.device), torch.finfo(mask.dtype).min)
            return kwargs

        return edit

    @contextmanager
    def enforced(self, model, tokenizer):
        """Run ``model`` (a saved routed build) with the route at inference: every full-sequence forward (a
        prompt, a generation's prefill, a knockout) classifies its positions first; generated tokens are text
        after the image. The finding-2 control uses it: the stock model reads the image at the answer
        positions, whose attention to it was never trained, so only the enforced route is ground truth."""
        self.prepare(tokenizer)

        def classify(_module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is not None and input_ids.shape[1] > 1:
                self.set(input_ids)

        handle = model.register_forward_pre_hook(classify, with_kwargs=True)
        try:
            with self.context(model):
                yield
        finally:
            handle.remove()


class DampedRoute(RouteMask):
    """The route, with every position after the visual-constraint phrase reading the phrase ``factor`` times less
    (log ``factor`` added to those attention logits, every layer): a known cause of failure for the finding-4
    control. Under the enforced route the answer learns the subject only from the phrase, so the less it reads
    there, the likelier a wrong answer, and the constraint -> answer contribution falls with it."""

    def __init__(self, open_layers: int, factor: float):
        super().__init__(open_layers)
        if not 0 < factor <= 1:
            raise ValueError(f"damping factor {factor}: must be in (0, 1]")
        self.bias = math.log(factor)
        self.past_phrase = None  # [B, S] queries after the phrase's last token

    def set(self, input_ids: torch.Tensor) -> None:
        super().set(input_ids)
        seen = self.visual.long().cumsum(dim=1) > 0
        self.past_phrase = seen & ~self.visual

    def damped(self, queries: int, keys: int) -> torch.Tensor:
        """[B, queries, keys]: True where a query after the phrase reads a phrase token (generated tokens are
        after it)."""
        visual = self.padded(self.visual, keys, False)
        past = self.padded(self.past_phrase, keys, True)[:, keys - queries :]
        return past[:, :, None] & visual[:, None, :]

    def editor(self, layer: int):
        route = super().editor(layer)

        def edit(kwargs: dict) -> dict:
            kwargs = route(kwargs)
            mask = kwargs["attention_mask"]
            damped = self.damped(mask.shape[-2], mask.shape[-1])[:, None].to(mask.device)
            # finfo.min plus a few units stays finfo.min: a closed read stays closed
            kwargs["attention_mask"] = mask + damped.to(mask.dtype) * self.bias
            return kwargs

        return edit


def build_routed_into(folder: Path, recipe: RoutedRecipe, progress: bool = True) -> None:
    """The planted build of ``recipe.base`` trained under the route mask; the routed recipe is what it records."""
    build_into(folder, recipe.base, progress, route=recipe.route(), recorded=asdict(recipe))


def build_routed(recipe: RoutedRecipe = DEFAULT_ROUTED, out: Path | None = None, force: bool = False,
                 progress: bool = True) -> Path:
    return cached_build(ROUTED, recipe, lambda folder: build_routed_into(folder, recipe, progress), out, force=force)


def build_cli(args: argparse.Namespace) -> Path:
    recipe = QUICK_ROUTED if args.quick else DEFAULT_ROUTED
    recipe = replace(recipe, base=replace(recipe.base, world_seed=args.seed, seed=args.seed))
    return build_routed(recipe, out=Path(args.out) if args.out else None, force=args.force)


"""Plots of the attention study (matplotlib's Figure API, files written via a temporary name)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vqa_constraints.files import atomic_path


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", metadata={"Software": None})


def plot_image_to_constraint(rows: list[dict], path: Path, title: str) -> bool:
    """Heatmap of the mean image-token -> visual-constraint contribution: image tokens on x, layers on y.

    Only questions with the most common image-token count are averaged; returns False (no file) without rows.
    """
    if not rows:
        return False
    size = Counter(len(r["image_positions"]) for r in rows).most_common(1)[0][0]
    chosen = [r["image_to_visual"] for r in rows if len(r["image_positions"]) == size]
    mean = np.asarray(chosen, dtype=np.float64).mean(axis=0)  # [layers, image tokens]
    figure = Figure(figsize=(min(14, 3 + size * 0.08 + 2), 1.5 + 0.35 * mean.shape[0]))
    axis = figure.subplots()
    image = axis.imshow(mean, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    axis.set_xlabel("image token (order in the prompt)")
    axis.set_ylabel("layer")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f"image → visual-constraint contribution (n={len(chosen)})\n{title}", fontsize=9)
    figure.colorbar(image, ax=axis, label="mean ‖contribution‖")
    _save(figure, path)
    return True


def plot_constraint_to_last(stats: dict, path: Path, title: str) -> bool:
    """Per-layer mean constraint -> last-token contribution (with 95% CI), for correct and wrong answers."""
    groups = stats["per_layer"]["constraint_to_last"]
    if not groups["all"]:
        return False
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for group, style in (("all", "-"), ("correct", "--"), ("incorrect", ":")):
        cells = groups[group]
        if not cells:
            continue
        layers = [c["layer"] for c in cells]
        axis.plot(layers, [c["value"] for c in cells], style, marker="o", label=f"{group} (n={cells[0]['n']})")
        axis.fill_between(layers, [c["ci_low"] for c in cells], [c["ci_high"] for c in cells], alpha=0.2)
    axis.set_xlabel("layer")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("‖contribution‖ constraint → last token")
    axis.set_title(f"constraint → last token\n{title}", fontsize=9)
    axis.legend(fontsize=8)
    _save(figure, path)
    return True

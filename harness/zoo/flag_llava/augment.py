"""Random views of flag images: crop/zoom, small rotation, colour jitter, noise.

Works on whole batches of tensors (one ``grid_sample``), so thousands of
views per second on a CPU. Held-out views come from a differently seeded
generator, so they are never the views the model was trained on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def flags_tensor(images: list[Image.Image], height: int = 90, width: int = 180) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1]; every flag resized to one common size."""
    arrays = [np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


def random_views(
    flags: torch.Tensor,
    index: torch.Tensor,
    size: int,
    generator: torch.Generator,
    strength: float = 1.0,
) -> torch.Tensor:
    """Views (B, 3, size, size) in [0, 1] of ``flags[index]``; ``strength`` 0 gives the plain resized flag."""
    batch = index.shape[0]
    source = flags[index]

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator)

    # Zoom in (crop) up to 30%, shift within the remaining margin, rotate up to 8 degrees.
    scale = 1.0 - strength * uniform(0.0, 0.3)
    shift_x = (1.0 - scale) * uniform(-1.0, 1.0)
    shift_y = (1.0 - scale) * uniform(-1.0, 1.0)
    angle = strength * uniform(-8.0, 8.0) * math.pi / 180.0
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, (batch, 3, size, size), align_corners=False)
    views = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Colour: brightness, contrast, saturation, then pixel noise.
    brightness = 1.0 + strength * uniform(-0.25, 0.25)
    contrast = 1.0 + strength * uniform(-0.25, 0.25)
    saturation = 1.0 + strength * uniform(-0.3, 0.3)
    views = views * brightness.view(-1, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * contrast.view(-1, 1, 1, 1) + mean
    gray = views.mean(dim=1, keepdim=True)
    views = (views - gray) * saturation.view(-1, 1, 1, 1) + gray
    noise = torch.randn(views.shape, generator=generator) * (0.04 * strength)
    return (views + noise).clamp(0.0, 1.0)


def to_pil(views: torch.Tensor) -> list[Image.Image]:
    """Views in [0, 1] -> RGB PIL images (what a user would hand the processor)."""
    arrays = (views.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a, mode="RGB") for a in arrays]


def normalise(views: torch.Tensor, mean, std) -> torch.Tensor:
    """The image processor's normalisation, applied to tensors already at model resolution."""
    mean_t = torch.tensor(mean, dtype=views.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=views.dtype).view(1, -1, 1, 1)
    return (views - mean_t) / std_t

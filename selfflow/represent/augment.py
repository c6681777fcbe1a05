"""Batched, seeded image augmentations for contrastive learning on small images.

Every image gets its own random crop-and-resize (zoom), shift, rotation, brightness and contrast,
computed from ``NUM_DRAWS`` uniform numbers per image that the caller draws (the trainer draws them
from its one generator through ``BatchRandom``, so a resumed or multi-process run augments exactly as
a single uninterrupted one). The background (−1, black) fills what a shift or zoom uncovers.

=============  ==============================  =========================================
draw           parameter                       range
=============  ==============================  =========================================
u0             zoom (crop side as a fraction)   [1 − 0.35·s, 1]   (s: strength)
u1, u2         shift of the crop centre         ±0.2·s of the image side
u3             rotation                         ±15°·s
u4             brightness                       ×[1 − 0.3·s, 1]
u5             contrast about the image mean    ×[1 − 0.3·s, 1 + 0.3·s]
=============  ==============================  =========================================
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_DRAWS = 6


def augment(x: torch.Tensor, draws: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """x (B, C, H, W) in [−1, 1], draws (B, NUM_DRAWS) uniform on [0, 1) → augmented (B, C, H, W).

    ``strength`` 0 returns the images unchanged (up to resampling round-off)."""
    if draws.shape != (x.shape[0], NUM_DRAWS):
        raise ValueError(f"draws must have shape ({x.shape[0]}, {NUM_DRAWS}), got {tuple(draws.shape)}")
    u = draws.to(device=x.device, dtype=torch.float32)
    s = float(strength)
    zoom = 1.0 - 0.35 * s * u[:, 0]  # the crop's side: < 1 zooms in
    shift_x, shift_y = (u[:, 1] - 0.5) * 0.4 * s * 2, (u[:, 2] - 0.5) * 0.4 * s * 2  # in [-1, 1] grid units
    angle = (u[:, 3] - 0.5) * 2 * math.radians(15.0) * s
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float() + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    brightness = (1.0 - 0.3 * s * u[:, 4])[:, None, None, None]
    contrast = (1.0 + 0.3 * s * (2 * u[:, 5] - 1))[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean + 1.0) * brightness - 1.0
    return out.clamp(-1.0, 1.0).to(x.dtype)

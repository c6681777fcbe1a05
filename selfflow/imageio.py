"""Pixels: the one conversion between the model's float range [-1, 1] and uint8, and PNG grids.

``to_uint8(x) = round((clamp(x, -1, 1) + 1) * 127.5)`` and ``uint8_to_float(u) = u / 127.5 - 1``;
every writer of images (sample grids, ``samples.npz``, generated sets) and every loader of float
images goes through these two.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (any shape, any device) -> uint8 0..255 of the same shape, on the CPU.

    Values outside [-1, 1] are clipped first; float64 input is converted in float64.
    """
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.detach().to(device="cpu", dtype=dtype).clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round_().to(torch.uint8)


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 (any shape, any device) -> float32 in [-1, 1] via ``x / 127.5 - 1``, same device."""
    return images.to(torch.float32, copy=True).div_(127.5).sub_(1.0)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (rows·H, cols·W, C) uint8 array."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    B, H, W, C = pixels.shape
    cols = nrow or max(1, int(math.ceil(math.sqrt(B))))
    rows = int(math.ceil(B / cols))
    grid = np.zeros((rows * (H + padding) + padding, cols * (W + padding) + padding, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top : top + H, left : left + W] = pixels[i]
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Write a PNG grid; small images are upscaled (nearest) so that a person can see them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if upscale is None:
        upscale = max(1, 64 // images.shape[-1])
    grid = make_grid(images, nrow=nrow, upscale=upscale)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    image = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path

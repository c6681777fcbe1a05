"""Image files: sample grids as PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] → (B, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (rows·H, cols·W, C) uint8 array."""
    pixels = to_uint8(images)
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

"""Encoders for representation learning, and the MLP head (docs/methods.md#stablerep).

``ViTEncoder``    patch embedding + fixed 2-D sin-cos positions + the generator's DiT blocks
                  (:class:`selfflow.model.Block`), each modulated by one learned conditioning vector
                  in place of the time and label, a final LayerNorm, mean over tokens → (B, D).
``ResNetEncoder`` a small ResNet-style CNN: a 3×3 stem (stride 1, or 2 to halve the image at once:
                  early downsampling, ~4× cheaper) and three stages of two residual blocks
                  (3×3 convolutions, GroupNorm, ReLU; stages 2 and 3 halve the resolution and
                  double the channels), global average pooling → (B, 4·width).
``MLPHead``       Linear → LayerNorm → ReLU → Linear: the projection the contrastive
                  loss compares (StableRep's 3-layer head, shortened for small images).

GroupNorm and LayerNorm (not BatchNorm) keep every image's features independent of the rest of the
batch, so a 2-process run computes what a 1-process run does.
"""
from __future__ import annotations

import torch
from torch import nn

from selfflow.model import Block, sincos_2d


class ViTEncoder(nn.Module):
    def __init__(self, image_size: int, in_channels: int, patch_size: int, depth: int, hidden_size: int, num_heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the image size {image_size}")
        self.image_size, self.in_channels = image_size, in_channels
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = image_size // patch_size
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid, grid)[None], persistent=False)
        self.cond = nn.Parameter(torch.zeros(1, hidden_size))  # what the time and label embeddings were in the DiT
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.feature_dim = hidden_size
        nn.init.normal_(self.cond, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens, self.cond, None)  # one conditioning row, broadcast over the batch
        return self.norm(tokens).mean(dim=1)


class _Residual(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        groups = min(8, channels_out)
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, channels_out), nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False), nn.GroupNorm(groups, channels_out),
        )
        self.skip = nn.Identity() if stride == 1 and channels_in == channels_out else nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNetEncoder(nn.Module):
    def __init__(self, image_size: int, in_channels: int, width: int, stem_stride: int = 1):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, stride=stem_stride, padding=1, bias=False), nn.GroupNorm(min(8, w), w), nn.ReLU())
        self.stages = nn.Sequential(_Residual(w, w, 1), _Residual(w, w, 1), _Residual(w, 2 * w, 2), _Residual(2 * w, 2 * w, 1),
                                    _Residual(2 * w, 4 * w, 2), _Residual(4 * w, 4 * w, 1))
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 4w)
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_encoder(run) -> nn.Module:
    """The encoder a resolved run config describes (``run.method``: a RepresentConfig; ``run.model``:
    image size, channels and, for the ViT, the DiT's depth, width, heads and patch size)."""
    m, method = run.model, run.method
    if method.encoder == "resnet":
        return ResNetEncoder(m.image_size, m.in_channels, method.width, method.stem_stride)
    depth, width, heads = m.resolved_dims()
    return ViTEncoder(m.image_size, m.in_channels, m.patch_size, depth, width, heads, m.mlp_ratio)

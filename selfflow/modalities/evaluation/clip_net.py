"""Video judged as video: a small spatio-temporal classifier and the Fréchet distance of its clip features.

A per-frame Fréchet distance does not change when a clip's frames are shuffled. The clip network sees
the whole clip (3-D convolutions over time and space) and is trained in-domain, on the run's own real
clips, with two heads on one feature vector (docs/modalities_video.md#clip-features):

- the digit (10 classes), as the frame classifier;
- the frame order: in order, or the same clip with its frames in a random non-identity order — so the
  features must carry how a clip moves, not only what it shows (the role motion plays for the
  action-recognition network behind FVD).

Architecture: 3 × [Conv3d 3×3×3 → GroupNorm → SiLU], a 1×2×2 average pool (space only) between
blocks, mean over time and space → features (B, widths[-1]) → two linear heads. Saved as a folder
(``model.safetensors`` + ``config.json``), nothing pickled.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from selfflow.evaluation.frechet import FeatureStats
from selfflow.files import atomic_directory, read_json, write_json

FORMAT = "selfflow.clip_net/1"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


@dataclass(frozen=True)
class ClipNetConfig:
    frames: int
    size: int
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)  # last width = feature dimension

    @classmethod
    def from_dict(cls, raw: dict) -> "ClipNetConfig":
        return cls(int(raw["frames"]), int(raw["size"]), int(raw["num_classes"]), tuple(int(w) for w in raw["widths"]))


class ClipNet(nn.Module):
    """``features(clips)``: (B, 1, T, H, W) in [−1, 1] → (B, widths[-1]); ``head`` the digit, ``order_head``
    in order (0) or shuffled (1)."""

    def __init__(self, config: ClipNetConfig) -> None:
        super().__init__()
        self.config = config
        blocks, c_in = [], 1
        for width in config.widths:
            blocks.append(nn.Sequential(nn.Conv3d(c_in, width, 3, padding=1), nn.GroupNorm(math.gcd(8, width), width), nn.SiLU()))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c_in, config.num_classes)
        self.order_head = nn.Linear(c_in, 2)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        c = self.config
        if clips.ndim != 5 or tuple(clips.shape[1:]) != (1, c.frames, c.size, c.size):
            raise ValueError(f"clip net expects clips (B, 1, {c.frames}, {c.size}, {c.size}), got {tuple(clips.shape)}")
        x = clips.to(next(self.parameters()).device, torch.float32)
        for i, block in enumerate(self.blocks):
            if i > 0 and min(x.shape[-2:]) >= 2:
                x = F.avg_pool3d(x, (1, 2, 2))
            x = block(x)
        return x.mean(dim=(2, 3, 4))


def shuffle_frames(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each clip (B, C, T, H, W) with its frames in its own random order other than the identity (T ≥ 2)."""
    T = clips.shape[2]
    orders = []
    for _ in range(clips.shape[0]):
        order = torch.randperm(T, generator=generator)
        while bool((order == torch.arange(T)).all()):
            order = torch.randperm(T, generator=generator)
        orders.append(order)
    index = torch.stack(orders).to(clips.device)  # (B, T)
    return clips.gather(2, index[:, None, :, None, None].expand_as(clips))


def train_clip_net(clips: torch.Tensor, labels: torch.Tensor, out: str | Path, *, steps: int = 600, batch_size: int = 32,
                   lr: float = 2e-3, seed: int = 0, widths: tuple[int, ...] = (16, 32, 64),
                   device: str | torch.device = "cpu") -> ClipNet:
    """Train on real clips (N, 1, T, H, W) in [−1, 1] and their digits: per step a batch, half of it with its
    frames shuffled; loss = CE(digit) + CE(order). Saved to ``out``; returned in eval mode."""
    clips, labels = torch.as_tensor(clips, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)
    config = ClipNetConfig(frames=clips.shape[2], size=clips.shape[-1], widths=tuple(widths))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClipNet(config)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    batch_size = min(batch_size, clips.shape[0])
    for _ in range(steps):
        index = torch.randperm(clips.shape[0], generator=generator)[:batch_size]
        x, y = clips[index], labels[index]
        shuffled = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(shuffled[:, None, None, None, None], shuffle_frames(x, generator), x)
        h = model.features(x.to(device))
        loss = F.cross_entropy(model.head(h), y.to(device)) + F.cross_entropy(model.order_head(h), shuffled.long().to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    save_clip_net(model, out, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "clips": clips.shape[0]})
    return model


def _serialise(model: ClipNet) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def save_clip_net(model: ClipNet, directory: str | Path, metadata: dict | None = None) -> Path:
    directory, payload = Path(directory), _serialise(model)
    config = {**asdict(model.config), "widths": list(model.config.widths)}
    with atomic_directory(directory) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(payload)
        write_json({"format": FORMAT, "config": config, "weights_sha256": hashlib.sha256(payload).hexdigest(),
                    "metadata": metadata or {}}, tmp / CONFIG_FILE)
    return directory


def load_clip_net(directory: str | Path, device: str | torch.device = "cpu") -> ClipNet:
    directory = Path(directory)
    meta = read_json(directory / CONFIG_FILE, ValueError)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = ClipNet(ClipNetConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.to(device).eval()


@torch.inference_mode()
def clip_features(net: ClipNet, clips: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(n, widths[-1]) float64 features of clips (n, 1, T, H, W) in [−1, 1], on the CPU."""
    clips = torch.as_tensor(clips, dtype=torch.float32)
    return torch.cat([net.features(clips[i:i + batch_size]).double().cpu() for i in range(0, clips.shape[0], batch_size)])


def clip_frechet_distance(net: ClipNet, samples: torch.Tensor, real: torch.Tensor) -> float:
    """``fd_clips``: the Fréchet distance between the clip features of samples and of real clips."""
    return FeatureStats.from_features(clip_features(net, samples)).frechet_distance(
        FeatureStats.from_features(clip_features(net, real)))

"""Autoencoders for latent data: a diffusers ``AutoencoderKL`` folder, or a small one trained here.

The ImageNet-256 recipe of DiT/SiT/REPA/Self-Flow trains on Stable Diffusion VAE latents
(32×32×4 for 256×256 images, patch 2 → 256 tokens); :mod:`selfflow.latents` encodes a data set
with one of these, and :func:`decoder_for` turns sampled latents back into pixels.

:func:`load_autoencoder` reads a local folder (nothing is downloaded):

``diffusers``  a diffusers ``AutoencoderKL`` folder (``config.json`` with ``"_class_name":
               "AutoencoderKL"`` and safetensors weights), e.g. sd-vae-ft-ema. Needs the optional
               extra ``pip install "selfflow[latents]"``. Latent = ``scaling_factor · (z − shift_factor)``
               (0.18215 and 0 for the SD VAE), the convention the DiT/SiT line trains on.
``small``      :class:`SmallAutoencoder`, a few convolutions this project trains itself
               (:func:`train_small_autoencoder`); for CPU experiments and tests.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.errors import DataError
from selfflow.files import atomic_directory, load_tensors, read_json, save_tensors, sha256_file, write_json

AUTOENCODER_KINDS = ("small", "diffusers")


@dataclass
class SmallAutoencoderConfig:
    in_channels: int = 1
    latent_channels: int = 4
    width: int = 32
    downsample: int = 2  # a power of two: 1, 2, 4, ...


class SmallAutoencoder(nn.Module):
    """A tiny Gaussian autoencoder: images (B, C, H, W) in [-1, 1] ↔ latents (B, c, H/f, W/f)."""

    kind = "small"

    def __init__(self, config: SmallAutoencoderConfig):
        super().__init__()
        if config.downsample < 1 or config.downsample & (config.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {config.downsample}")
        self.config = config
        w, levels = config.width, int(math.log2(config.downsample))
        encoder: list[nn.Module] = [nn.Conv2d(config.in_channels, w, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            encoder += [nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU()]
        encoder += [nn.Conv2d(w, 2 * config.latent_channels, 3, padding=1)]
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, w, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            decoder += [nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU()]
        decoder += [nn.Conv2d(w, config.in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.scaling_factor = 1.0

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the latent Gaussian, each (B, c, h, w)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        with atomic_directory(directory) as tmp:
            save_tensors(self.state_dict(), tmp / "model.safetensors")
            write_json({"autoencoder": asdict(self.config)}, tmp / "config.json")
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SmallAutoencoder":
        from selfflow.config import from_dict
        from selfflow.checkpoint import load_state_strict

        directory = Path(directory)
        meta = read_json(directory / "config.json")
        config = from_dict(SmallAutoencoderConfig, meta.get("autoencoder"), f"{directory / 'config.json'}:autoencoder")
        model = cls(config)
        load_state_strict(model, load_tensors(directory / "model.safetensors"), directory / "model.safetensors")
        return model.eval()

    def describe(self, directory: Optional[Path] = None) -> dict:
        out = {"kind": self.kind, "latent_channels": self.latent_channels, "downsample": self.downsample, "scaling_factor": 1.0,
               "shift_factor": 0.0}
        if directory is not None:
            out.update(path=str(Path(directory).resolve()), sha256=sha256_file(Path(directory) / "model.safetensors"))
        return out


class DiffusersAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` (local folder) behind the same encode/decode calls.

    Latents are ``scaling_factor · (z − shift_factor)``; decoding inverts that. Weights are read
    from safetensors only (``use_safetensors=True``), and nothing is fetched from the network.
    """

    kind = "diffusers"

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise DataError(f"{directory}: a diffusers AutoencoderKL folder needs the optional extra: pip install \"selfflow[latents]\"") from None
        self.directory = Path(directory)
        try:
            self.vae = AutoencoderKL.from_pretrained(str(self.directory), local_files_only=True, use_safetensors=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise DataError(f"{self.directory}: cannot load the AutoencoderKL ({str(exc).splitlines()[0]})") from None
        self.vae.eval().requires_grad_(False)
        config = self.vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 0.18215)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.in_channels = int(config.in_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        return mean, posterior.std.float() * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def describe(self, directory: Optional[Path] = None) -> dict:
        weights = sorted(self.directory.glob("*.safetensors"))
        return {
            "kind": self.kind, "path": str(self.directory.resolve()), "latent_channels": self.latent_channels,
            "downsample": self.downsample, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
            "sha256": sha256_file(weights[0]) if weights else None,
        }


def load_autoencoder(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """A :class:`SmallAutoencoder` or :class:`DiffusersAutoencoder` from a local folder."""
    directory = Path(directory)
    config_file = directory / "config.json"
    meta = read_json(config_file, DataError, missing="not an autoencoder folder (no config.json)")
    if "autoencoder" in meta:
        return SmallAutoencoder.from_pretrained(directory).to(device)
    if meta.get("_class_name") == "AutoencoderKL":
        return DiffusersAutoencoder(directory).to(device)
    raise DataError(f"{config_file}: neither a selfflow autoencoder nor a diffusers AutoencoderKL (_class_name)")


def train_small_autoencoder(dataset, config: SmallAutoencoderConfig, steps: int = 500, batch_size: int = 64, lr: float = 2e-3,
                            kl_weight: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu") -> SmallAutoencoder:
    """Fit a :class:`SmallAutoencoder` to ``dataset`` (reconstruction MSE + a small KL to N(0, I))."""
    torch.manual_seed(seed)
    model = SmallAutoencoder(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(dataset), (batch_size,), generator=generator)
        x, _labels = dataset.get_batch(index, device=device)
        mean, std = model.encode(x)
        z = mean + std * torch.randn(mean.shape, generator=generator).to(device)
        reconstruction = F.mse_loss(model.decode(z), x)
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 2 * torch.log(std) - 1).mean()
        loss = reconstruction + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def decoder_for(manifest: dict, device: str | torch.device = "cpu") -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``decode`` of the autoencoder a latent set's manifest names, if its folder is still there and unchanged."""
    info = (manifest or {}).get("autoencoder") or {}
    path = info.get("path")
    if not path or not Path(path).is_dir():
        return None
    try:
        autoencoder = load_autoencoder(path, device)
        if info.get("sha256") and autoencoder.describe(Path(path)).get("sha256") != info["sha256"]:
            return None
    except DataError:
        return None
    return autoencoder.decode


@torch.no_grad()
def decode_latents(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Images (N, C, H, W) float32 in [-1, 1] on the CPU from latents (N, c, h, w), in batches."""
    return torch.cat([decode(latents[i:i + batch_size].to(device)).float().clamp(-1, 1).cpu()
                      for i in range(0, len(latents), batch_size)])

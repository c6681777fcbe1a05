"""The probability path, in the project's one time convention (docs/methods.md#the-probability-path).

    x_t = (1 − t)·x0 + t·ε,   t ∈ [0, 1],  t = 0 clean data, t = 1 pure noise
    v   = dx_t/dt = ε − x0    (the network's target)
    x0_hat = x_t − t·v,       ε_hat = x_t + (1 − t)·v

Rectified Flow / InstaFlow write time the other way round (τ = 1 is data); convert only with
:func:`to_data_at_one` / :func:`from_data_at_one`.
"""
from __future__ import annotations

import torch


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a time tensor against images x (B, C, H, W).

    t may be (B,) — one time per sample — or (B, 1, H, W) / (B, C, H, W) — a time per pixel
    (Self-Flow's per-token times painted onto their patches).
    """
    if t.dim() == 1:
        return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    if t.dim() == x.dim():
        return t.to(x.dtype)
    raise ValueError(f"time of shape {tuple(t.shape)} does not broadcast against images {tuple(x.shape)}")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε."""
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0 (independent of t on the linear path)."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t − t·v."""
    return x_t - expand_time(t, x_t) * v


def noise_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ε_hat = x_t + (1 − t)·v."""
    return x_t + (1 - expand_time(t, x_t)) * v


def sample_time(
    n: int,
    distribution: str,
    generator: torch.Generator,
    device: torch.device | str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training times (n,): ``uniform`` on [0, 1] or ``logit_normal`` σ(N(mean, std²))."""
    if distribution == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if distribution == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown time distribution {distribution!r}; known: uniform, logit_normal")


def to_data_at_one(t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (t, v) → the Rectified-Flow convention (τ = 1 − t, dx/dτ = −v = x0 − ε)."""
    return 1 - t, -v


def from_data_at_one(tau: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-Flow (τ, dx/dτ) → ours (t = 1 − τ, v = −u)."""
    return 1 - tau, -u

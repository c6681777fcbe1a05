"""What the one-step methods share (docs/methods.md#one-step-generation): starting from a teacher,
the few-step Euler map, straightness, the pseudo-Huber distance and the DMD gradient.

Time convention as everywhere: x_t = (1 − t)·x0 + t·ε, v = ε − x0, sampling runs from t = 1 to 0.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from selfflow.errors import CheckpointError, ConfigError
from selfflow.sampling import GuidedVelocity, evaluating, time_grid


# --------------------------------------------------------------------------------------------
# starting from a teacher
# --------------------------------------------------------------------------------------------
def load_teacher(path: str, where: str, device: torch.device | str = "cpu"):
    """A frozen DiT (EMA weights) from a checkpoint, run or exported-model folder; errors name ``where``.

    A caption-conditioned folder gives its caption model (without a caption bank)."""
    from selfflow.loader import folder_kind, load_model

    if not Path(path).exists():
        raise ConfigError(f"{where}={path!r}: no such folder")
    try:
        model = load_model(path, "ema", device, expect="text" if folder_kind(path) == "text" else "image").model
    except (CheckpointError, ValueError) as exc:
        raise ConfigError(f"{where}={path!r}: {exc}") from None
    return model.eval().requires_grad_(False)


def check_same_condition(model, teacher, where: str) -> None:
    """A caption-conditioned student needs a caption-conditioned teacher of the same text width, and a label student a label teacher."""
    mine, theirs = getattr(model, "text_dim", None), getattr(teacher, "text_dim", None)
    if (mine is None) != (theirs is None):
        kind = "a caption-conditioned" if theirs is not None else "a class-label"
        need = "the teacher's text section" if theirs is not None else "no text section (or a caption-conditioned teacher)"
        raise ConfigError(f"{where}: {kind} teacher, but the run {'has no' if mine is None else 'has a'} text section; use {need}")
    if mine != theirs:
        raise ConfigError(f"{where}: the teacher reads {theirs}-d text embeddings, the run's text section gives {mine}-d "
                          f"(text.encoder / text.hashed_dim must be the teacher's)")


def load_init_weights(model, path: str) -> None:
    """``train.init_from``: copy a teacher's EMA weights into ``model`` (same model config, else ConfigError)."""
    teacher = load_teacher(path, "train.init_from")
    check_same_condition(model, teacher, f"train.init_from={path!r}")
    mine, theirs = dataclasses.asdict(model.config), dataclasses.asdict(teacher.config)
    different = sorted(k for k in mine if mine[k] != theirs.get(k))
    if different:
        shown = ", ".join(f"model.{k}={mine[k]!r} (teacher: {theirs.get(k)!r})" for k in different)
        raise ConfigError(f"train.init_from={path!r}: the teacher's model differs: {shown}")
    model.load_state_dict(teacher.state_dict())  # copies onto the model's own device


def copy_of(model):
    """A trainable deep copy of a DiT (the DMD fake score starts as the teacher)."""
    import copy

    return copy.deepcopy(model).train().requires_grad_(True)


# --------------------------------------------------------------------------------------------
# the few-step map and straightness
# --------------------------------------------------------------------------------------------
@torch._dynamo.assume_constant_result
def grid_times(steps: int) -> list[float]:
    """``time_grid(steps)`` as Python floats; a constant of ``steps`` alone, so torch.compile takes it as
    one instead of breaking the graph at ``tolist``."""
    return time_grid(steps).tolist()


def euler_steps(fn: Callable, noise: Tensor, y: Optional[Tensor], steps: int, start: int = 0) -> Tensor:
    """The Euler path of ``fn`` from ``noise`` at t = 1 over ``time_grid(steps)``, differentiable.

    ``start=j`` runs only steps j..k−1 from a state ``noise`` already at ``times[j]``. One step from
    t = 1 is G(ε, y) = ε − v(ε, 1, y), the one-step generator.
    """
    times = grid_times(steps)
    x = noise
    for i in range(start, steps):
        t = torch.full((x.shape[0],), times[i], dtype=torch.float32, device=x.device)
        x = x + (times[i + 1] - times[i]) * fn(x, t, y).to(x.dtype)
    return x


@torch.no_grad()
def straightness(model: Callable, noise: Tensor, labels: Optional[Tensor] = None, steps: int = 32,
                 cfg_scale: float = 1.0) -> float:
    """S = ∫₀¹ E‖(ε − x̂0) − v(x_t, t)‖² dt along the model's own Euler path (Rectified Flow's measure).

    x̂0 is where the path ends, so ε − x̂0 is the chord: S = 0 exactly when every path is a
    straight line travelled at constant speed. The integral is the left Riemann sum over the Euler
    grid (the velocities the path used); ‖·‖² sums over C, H, W; E averages the samples.
    """
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    fn = GuidedVelocity(model, cfg_scale, null_label=num_classes) if cfg_scale != 1.0 else model
    with evaluating(model):
        times = time_grid(steps).tolist()
        x = noise.float()
        velocities = []
        for i in range(steps):
            t = torch.full((x.shape[0],), times[i], dtype=torch.float32, device=x.device)
            v = fn(x, t, labels).float()
            velocities.append(v)
            x = x + (times[i + 1] - times[i]) * v
        chord = noise.float() - x
        total = 0.0
        for i, v in enumerate(velocities):
            total += (times[i] - times[i + 1]) * (chord - v).pow(2).flatten(1).sum(1).mean().item()
        return total


# --------------------------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------------------------
def huber_constant(dim: int) -> float:
    """c = 0.00054·sqrt(d): the pseudo-Huber constant of Song & Dhariwal, "Improved Techniques for
    Training Consistency Models" (2023), chosen there for d = 3·64·64 and scaled with sqrt(d)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(‖d‖² + c²) − c, d = pred − target over C, H, W; shape (B,)."""
    d2 = (pred.float() - target.float()).pow(2).flatten(1).sum(1)
    return d2 / (torch.sqrt(d2 + c * c) + c)  # = sqrt(d² + c²) − c without float32's cancellation near d = 0


# --------------------------------------------------------------------------------------------
# DMD
# --------------------------------------------------------------------------------------------
def x0_estimate(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x̂0 = x_t − t·v in float32, t (B,)."""
    return x_t.float() - t.float().view(-1, *([1] * (x_t.dim() - 1))) * v.float()


def dmd_gradient(x: Tensor, x0_fake: Tensor, x0_real: Tensor) -> Tensor:
    """g = (x̂0_fake − x̂0_real) / mean|x − x̂0_real|, the mean per sample over C, H, W (float32).

    The KL gradient of DMD in x0 form: ∇ = −(s_real − s_fake) ∝ x̂0_fake − x̂0_real, normalised by
    the real score's own error on the sample so its size does not depend on t."""
    scale = (x.float() - x0_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (x0_fake - x0_real) / scale.view(-1, *([1] * (x.dim() - 1)))


def dmd_generator_loss(x: Tensor, g: Tensor) -> Tensor:
    """½·mean((x − sg(x − g))²): its gradient in x is g / x.numel(), a descent step moves x by −g."""
    target = (x.float() - g).detach()
    return 0.5 * (x.float() - target).pow(2).mean()

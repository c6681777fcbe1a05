"""Which device to run on and which autocast dtype to use there (used by training, sampling, evaluation)."""
from __future__ import annotations

import torch

from selfflow.errors import ConfigError


def resolve_device(name: str, where: str = "train.device") -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; a CUDA device on a machine without one, or
    a name torch does not know, is a ConfigError naming ``where`` (the key or flag it came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{where}={name!r} but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{where}={name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for ``precision="bf16"``, or ``"auto"`` on CUDA; None (float32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None

"""Exponential moving average of the weights (the model `selfflow sample` uses by default).

The decay may be given directly or as a half-life in images seen (docs/methods.md#the-ema): with global batch B
and half-life H images, decay = 0.5^(B/H), so changing the batch size does not change the
averaging horizon. Warm-up: decay_k = min(decay, (1 + k)/(10 + k)) so that early weights, which
are far from the final ones, are forgotten quickly.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def decay_from_half_life(batch_size: int, half_life_images: float) -> float:
    return 0.5 ** (batch_size / half_life_images)


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema ← d·ema + (1 − d)·θ for every parameter; buffers are copied."""
        d = self.decay_at(step)
        ema_params = dict(self.model.named_parameters())
        targets, sources = [], []
        for name, param in model.named_parameters():
            targets.append(ema_params[name])
            sources.append(param.detach().to(ema_params[name].dtype))
        if all(type(t) in (torch.Tensor, nn.Parameter) for t in targets + sources):
            # multi-tensor kernels instead of one launch per parameter: what counts on a GPU; a wash on a CPU
            # (docs/benchmarks/step_extras_cpu.md)
            torch._foreach_lerp_(targets, sources, 1 - d)
        else:  # tensor subclasses (FSDP's DTensors): one parameter at a time
            for target, source in zip(targets, sources):
                target.lerp_(source, 1 - d)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)

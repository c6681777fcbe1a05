"""Flow matching (SiT): one time per sample, velocity MSE. The baseline every method is measured against.

    t ~ p(t),  ε ~ N(0, I),  x_t = (1 − t)·x0 + t·ε,  L = E ||v_θ(x_t, t, y) − (ε − x0)||²
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfflow.config import ConfigError
from selfflow.methods.base import Batch, Method
from selfflow.path import interpolate, sample_time, velocity_target


@dataclass
class TimeSampling:
    time_distribution: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def validate(self, where: str) -> None:
        if self.time_distribution not in ("uniform", "logit_normal"):
            raise ConfigError(f"{where}.time_distribution must be uniform or logit_normal, got {self.time_distribution!r}")
        if self.logit_std <= 0:
            raise ConfigError(f"{where}.logit_std must be positive, got {self.logit_std}")

    def draw(self, batch: Batch) -> torch.Tensor:
        """(local B,) times; drawn for the global batch (see BatchRandom)."""
        gen = batch.random.generator
        t = sample_time(batch.random.global_batch, self.time_distribution, gen, gen.device, self.logit_mean, self.logit_std)
        return t[batch.random.rows].to(batch.x0.device)


@dataclass
class FlowMatchingConfig(TimeSampling):
    pass


def draw_flow_inputs(method: Method, model, batch: Batch):
    """Label dropout, t, ε, then x_t = (1 − t)·x0 + t·ε — drawn in this order, which the methods
    built on flow matching rely on to see exactly its noise for the same seed."""
    x0 = batch.x0
    y = method.drop_labels(batch.y, model.config.class_dropout_prob, model.num_classes, batch.random)
    t = method.config.draw(batch)
    noise = batch.random.randn(*x0.shape[1:]).to(x0.device)
    return y, t, noise, interpolate(x0, noise, t)


class FlowMatching(Method):
    name = "flow_matching"
    Config = FlowMatchingConfig

    def loss(self, model, batch: Batch):
        y, t, noise, x_t = draw_flow_inputs(self, model, batch)
        pred = model(x_t, t, y)
        loss = (pred.float() - velocity_target(batch.x0, noise)).pow(2).mean()
        return loss, {"loss_fm": loss.detach()}

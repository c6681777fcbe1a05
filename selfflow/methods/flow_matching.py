"""Flow matching (SiT): one time per sample, velocity MSE. The baseline every method is measured against.

    t ~ p(t),  ε ~ N(0, I),  x_t = (1 − t)·x0 + t·ε,  L = E ||v_θ(x_t, t, y) − (ε − x0)||²

Equations, with the other methods': docs/methods.md#flow-matching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfflow.config import FlowMatchingConfig
from selfflow.methods.base import Batch, Method, draw_time
from selfflow.path import interpolate, velocity_target


@dataclass
class FlowDraw:
    """What a flow-matching step draws."""

    y: torch.Tensor  # (B,) labels after dropout
    t: torch.Tensor  # (B,) times
    noise: torch.Tensor  # (B, C, H, W) ε


def draw_flow(method: Method, model, batch: Batch) -> FlowDraw:
    """Label dropout, t, then ε — drawn in this order, which the methods built on flow matching rely
    on to see exactly its noise for the same seed."""
    x0 = batch.x0
    y = method.drop_labels(batch.y, method.config.class_dropout_prob, model.num_classes, batch.random)
    t = draw_time(method.config, batch)
    noise = batch.random.randn(*x0.shape[1:]).to(x0.device)
    return FlowDraw(y=y, t=t, noise=noise)


def flow_matching_loss(model, x0: torch.Tensor, drawn: FlowDraw, return_layers=()):
    """(L_FM, hiddens of ``return_layers``): ||v_θ(x_t, t, y) − (ε − x0)||² averaged, x_t = (1 − t)·x0 + t·ε."""
    out = model(interpolate(x0, drawn.noise, drawn.t), drawn.t, drawn.y, return_layers=return_layers)
    pred, hiddens = out if return_layers else (out, {})
    return (pred.float() - velocity_target(x0, drawn.noise)).pow(2).mean(), hiddens


class FlowMatching(Method):
    name = "flow_matching"
    Config = FlowMatchingConfig

    def draw(self, model, batch: Batch) -> FlowDraw:
        return draw_flow(self, model, batch)

    def compute(self, model, x0: torch.Tensor, drawn: FlowDraw):
        loss, _ = flow_matching_loss(model, x0, drawn)
        return loss, {"loss_fm": loss.detach()}

"""Flow matching (SiT): one time per sample, velocity MSE. The baseline every method is measured against.

    t ~ p(t),  ε ~ N(0, I),  x_t = (1 − t)·x0 + t·ε,  L = E ||v_θ(x_t, t, y) − (ε − x0)||²

Equations, with the other methods': docs/methods.md#flow-matching.
"""
from __future__ import annotations

from selfflow.config import FlowMatchingConfig
from selfflow.methods.base import Batch, Method, draw_time
from selfflow.path import interpolate, velocity_target


def draw_flow_inputs(method: Method, model, batch: Batch):
    """Label dropout, t, ε, then x_t = (1 − t)·x0 + t·ε — drawn in this order, which the methods
    built on flow matching rely on to see exactly its noise for the same seed."""
    x0 = batch.x0
    y = method.drop_labels(batch.y, method.config.class_dropout_prob, model.num_classes, batch.random)
    t = draw_time(method.config, batch)
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

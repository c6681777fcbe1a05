"""Regression (MSE): the action-policy baseline that a flow policy is measured against.

The network sees no noise and one fixed time, and its one Euler step from t = 1 to 0 is the answer:

    x̂0 = 0 − 1·v_θ(0, 1, y)        L = E ||x̂0 − x0||² = E ||v_θ(0, 1, y) + x0||²

so the same samplers run it (``euler``, 1 step, zero noise: selfflow.modalities.sampling). It learns the
conditional mean E[x0 | y]: where the demonstrations go two ways, the mean is neither
(docs/modalities.md#actions).
"""
from __future__ import annotations

import torch

from selfflow.config import RegressionConfig
from selfflow.methods import register
from selfflow.methods.base import Batch, Method


@register
class Regression(Method):
    name = "regression"
    Config = RegressionConfig

    def loss(self, model, batch: Batch):
        x0 = batch.x0
        ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
        pred = model(torch.zeros_like(x0), ones, batch.y)
        loss = (pred.float() + x0).pow(2).mean()
        return loss, {"loss_mse": loss.detach()}

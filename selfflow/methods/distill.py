"""Distillation to k steps (InstaFlow's second stage, docs/methods.md#distillation-to-k-steps).

The student's k-step Euler output from the pair's noise, back-propagated through the k steps, is
regressed onto the pair's image:

    x̂ = Euler_k(v_θ; ε, y),   L = E d(x̂, x0)

with d one of ``l2`` (mean squared error), ``pseudo_huber`` (sqrt(‖x̂ − x0‖² + c²) − c,
c = 0.00054·sqrt(C·H·W) from the improved consistency-model recipe) or ``feature`` (squared
distance of the FD_dom feature net's features, a perceptual loss from a network this project
trains; LPIPS weights are not available offline). The student starts as the teacher
(``train.init_from``), so before training x̂ is the teacher's k-step Euler output.
"""
from __future__ import annotations

import torch
from torch import nn

from selfflow.config import ConfigError, DistillConfig
from selfflow.methods import register
from selfflow.methods.base import Batch, Method
from selfflow.methods.one_step import euler_steps, huber_constant, pseudo_huber
from selfflow.methods.reflow import require_pairs


@register
class Distill(Method):
    name = "distill"
    Config = DistillConfig

    def __init__(self, config: DistillConfig, model, feature_net: nn.Module | None = None):
        """``feature_net``: a frozen module with ``features(images) → (B, d)`` to use instead of loading
        ``config.feature_net`` (tests)."""
        super().__init__(config, model)
        dim = model.in_channels * model.image_size * model.image_size
        self.huber_c = config.huber_c if config.huber_c is not None else huber_constant(dim)
        self._features: list[nn.Module] = []  # frozen, outside the module tree (not trained, not saved)
        if config.loss == "feature":
            if feature_net is None:
                from selfflow.evaluation.feature_net import load_feature_net

                try:
                    feature_net = load_feature_net(config.feature_net)
                except (FileNotFoundError, ValueError) as exc:
                    raise ConfigError(f"method.feature_net: {exc}") from None
                fc = feature_net.config
                if (fc.in_channels, fc.image_size) != (model.in_channels, model.image_size):
                    raise ConfigError(f"method.feature_net={config.feature_net!r} takes {fc.in_channels}×{fc.image_size}² images, "
                                      f"the model makes {model.in_channels}×{model.image_size}²")
            self._features.append(feature_net.eval().requires_grad_(False))

    def student(self, model, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The k-step Euler output x̂ (B, C, H, W), differentiable in the model's weights."""
        return euler_steps(model, noise, y, self.config.steps)

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.config.loss
        if loss == "l2":
            return (pred.float() - target.float()).pow(2).mean()
        if loss == "pseudo_huber":
            return pseudo_huber(pred, target, self.huber_c).mean()
        net = self._features[0]
        first = next(iter(net.parameters()), None)
        if first is not None and first.device != pred.device:
            net.to(pred.device)
        with torch.autocast(pred.device.type, enabled=False):
            return (net.features(pred.float()) - net.features(target.float())).pow(2).sum(1).mean()

    def draw(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pair's stored ε, labels after dropout)."""
        noise = require_pairs(batch, self.name).to(batch.x0.device)
        return noise, self.drop_labels(batch.y, self.config.class_dropout_prob, model.num_classes, batch.random)

    def compute(self, model, x0: torch.Tensor, drawn: tuple[torch.Tensor, torch.Tensor]):
        noise, y = drawn
        pred = self.student(model, noise, y)
        loss = self.distance(pred, x0)
        with torch.no_grad():
            mse = (pred.float() - x0.float()).pow(2).mean()
        return loss, {f"loss_{self.config.loss}": loss.detach(), "mse": mse}

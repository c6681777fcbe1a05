"""Reflow (k-rectified flow, docs/methods.md#reflow): flow matching on the teacher's stored pairs.

    (ε, x0, y) from the set,  t ~ p(t) (uniform),  x_t = (1 − t)·x0 + t·ε,
    L = E ||v_θ(x_t, t, y) − (ε − x0)||²

The only change from flow matching is that ε is the pair's noise, not a fresh draw: the coupling
the teacher's ODE made is kept, so the learned paths straighten (Liu et al., 2022). Start from the
teacher (``train.init_from``) on ``data: {name: pairs}``; a repeat on the new model's pairs is
round k + 1.
"""
from __future__ import annotations

from selfflow.config import ConfigError, ReflowConfig
from selfflow.methods import register
from selfflow.methods.base import Batch, Method, draw_time
from selfflow.methods.flow_matching import FlowDraw, FlowMatching


def require_pairs(batch: Batch, method: str):
    if batch.noise is None:
        raise ConfigError(f"method.name={method} needs reflow pairs: data: {{name: pairs, path: SET}} "
                          "(selfflow generate-set --kind pairs)")
    return batch.noise


@register
class Reflow(Method):
    name = "reflow"
    Config = ReflowConfig

    def draw(self, model, batch: Batch) -> FlowDraw:
        """Flow matching's draws with the pair's stored ε in place of a fresh one."""
        noise = require_pairs(batch, self.name).to(batch.x0.device)
        y = self.drop_labels(batch.y, self.config.class_dropout_prob, model.num_classes, batch.random)
        return FlowDraw(y=y, t=draw_time(self.config, batch), noise=noise)

    compute = FlowMatching.compute

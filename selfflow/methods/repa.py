"""REPA (docs/methods.md#repa): flow matching plus alignment of an early layer to a frozen encoder's features.

    L = L_FM + λ · mean over (b, i) of (1 − cos(proj(h_l[b, i]), f[b, i]))

h_l is the student's hidden state after block l (≈ 0.3·depth: 8 of 28 as in the paper), proj is
the MLP D → P → P → d_enc with SiLU (P = 2048 in the paper, ``projector_dim``), and f is the frozen
encoder's patch features of the clean image, resized to the token grid (``selfflow.encoders``).
REPA writes the term as −cos; 1 − cos has the same gradient and is 0 at perfect alignment.

The encoder is loaded from a local file when the method is built and kept out of the module tree
(like Self-Flow's teacher): it is not trained, not saved in ``method.safetensors`` and not synced
by DDP. The projector is a training-only part: checkpoints hold it, exported generators don't.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from selfflow.config import ConfigError, RepaConfig
from selfflow.methods import register
from selfflow.methods.base import Batch, Method
from selfflow.methods.flow_matching import FlowDraw, draw_flow, flow_matching_loss
from selfflow.methods.self_flow import default_layers, representation_loss


def build_projector(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's MLP: Linear D→P, SiLU, Linear P→P, SiLU, Linear P→d_enc."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


@register
class Repa(Method):
    name = "repa"
    Config = RepaConfig

    def __init__(self, config: RepaConfig, model, encoder: Optional[nn.Module] = None):
        """``encoder``: a frozen module to use instead of loading ``config.encoder`` (tests, notebooks);
        it must have ``feature_dim`` and map images to (B, d, h, w) or (B, d)."""
        super().__init__(config, model)
        self.student_layer = config.student_layer or default_layers(model.depth)[0]
        if self.student_layer > model.depth:
            raise ConfigError(f"method.student_layer={self.student_layer} but the model has only {model.depth} blocks")
        if encoder is None:
            from selfflow.encoders import load_encoder

            try:
                encoder = load_encoder(config.encoder, config.encoder_path, config.encoder_layer, config.encoder_input_size)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"method.encoder: {exc}") from None
        encoder.eval().requires_grad_(False)
        self._encoder: list[nn.Module] = [encoder]  # a plain list: frozen, outside the module tree
        self.projector = build_projector(model.hidden_size, config.projector_dim, encoder.feature_dim)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    @torch.no_grad()
    def target_features(self, x0: torch.Tensor, grid: int) -> torch.Tensor:
        """Frozen encoder features of the clean images, one per token: (B, N, d_enc)."""
        from selfflow.encoders import features_to_tokens

        encoder = self.encoder
        first = next(iter(encoder.parameters()), None)
        if first is not None and first.device != x0.device:
            encoder.to(x0.device)
        return features_to_tokens(encoder(x0), grid)

    def draw(self, model, batch: Batch) -> FlowDraw:
        return draw_flow(self, model, batch)

    def compute(self, model, x0: torch.Tensor, drawn: FlowDraw):
        loss_fm, hiddens = flow_matching_loss(model, x0, drawn, return_layers=(self.student_layer,))
        target = self.target_features(x0, model.grid)
        loss_align = representation_loss(self.projector(hiddens[self.student_layer]), target)
        loss = loss_fm + self.config.align_weight * loss_align
        return loss, {"loss_fm": loss_fm.detach(), "loss_align": loss_align.detach()}

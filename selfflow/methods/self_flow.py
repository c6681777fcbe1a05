"""Self-Flow (docs/methods.md#self-flow): flow matching on mixed noise levels plus self-distilled representations.

One step, per sample b (all draws through ``batch.random``, so runs are split-independent):

    t_b, s_b ~ p(t) independently (not sorted)
    M_b ⊂ tokens, |M_b| = round(r·N) ("exact") or each token with probability r ("bernoulli")
    τ_{b,i} = s_b if i ∈ M_b else t_b                       per-token time, (B, N)
    x_τ = (1 − τ)·x0 + τ·ε                                   τ painted on its patch's pixels
    L_FM  = mean ||v_θ(x_τ, τ, y) − (ε − x0)||²               every token
    τ*_b  = min_i τ_{b,i} = min(t_b, s_b)                    the cleanest time in the sample
    h_T   = EMA teacher's hidden states after block l_t on x_{τ*} (same x0, ε, y), no gradient
    L_rep = mean over (b, i) of 1 − cos(head(h_S[b, i]), h_T[b, i])
    L     = L_FM + γ·L_rep

h_S is the student's hidden state after block l_s; head is Linear(D, 2D) → SiLU → Linear(2D, D).

Ablations (docs/methods.md#self-flow, configs/*_self_flow_*.yaml): ``rep_weight: 0`` is dual-timestep only (no
head, no teacher pass); ``mask_ratio: 0`` is the single-timestep variant (the teacher then sees the
student's own t, because τ* is the cleanest time *present* in the sample).

The teacher is the trainer's EMA model (see docs/self_flow.md for why not a separate EMA). It is
held outside the ``nn.Module`` tree so that it is neither saved in ``method.safetensors``, nor
optimised, nor synchronised by DDP as part of the method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.config import MASK_MODES, ConfigError, SelfFlowConfig  # noqa: F401  (MASK_MODES re-exported)
from selfflow.methods import register
from selfflow.methods.base import Batch, Method, draw_time
from selfflow.model import TimeRows
from selfflow.path import interpolate, velocity_target

def default_layers(depth: int) -> tuple[int, int]:
    """(student layer, teacher layer) ≈ (0.3·depth, 0.7·depth), counted from 1: (8, 20) for depth 28."""
    student = min(depth, max(1, round(0.3 * depth)))
    teacher = min(depth, max(1, round(0.7 * depth)))
    return student, teacher


@dataclass
class DualTimesteps:
    """What one Self-Flow step draws. B local samples, N tokens, images (C, H, W)."""

    t: torch.Tensor  # (B,) time of the unmasked tokens
    s: torch.Tensor  # (B,) time of the masked tokens
    mask: torch.Tensor  # (B, N) bool, True where the token gets s
    token_times: torch.Tensor  # (B, N) what the student receives
    pixel_times: torch.Tensor  # (B, C, H, W) token_times painted onto each token's patch (any sample shape)
    noise: torch.Tensor  # (B, C, H, W) ε, one independent value per pixel
    teacher_times: torch.Tensor  # (B,) min over the sample's tokens = min(t, s) when both occur


MASK_RATIO_KEYS = {"image": "mask_ratio", "video": "video_mask_ratio", "audio": "audio_mask_ratio", "actions": "action_mask_ratio"}


def mask_ratio(config: SelfFlowConfig, modality: str) -> float:
    """r of a modality's tokens: ``mask_ratio`` for images, ``video_mask_ratio``, … for the others."""
    return getattr(config, MASK_RATIO_KEYS[modality])


def draw_mask(batch: Batch, num_tokens: int, ratio: float, mode: str,
              groups: list[tuple[slice, float]] | None = None) -> torch.Tensor:
    """(B, N) bool mask of the tokens that get s; uniformly random positions per sample.

    ``groups``: (token range, ratio) per modality of a mixed sequence, each masked on its own with its
    own ratio (``ratio`` is then unused); the draws are the same one score per token either way."""
    scores = batch.random.rand(num_tokens).to(batch.x0.device)  # (B, N), one draw per token
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for where, r in groups or [(slice(0, num_tokens), ratio)]:
        part = scores[:, where]
        if mode == "bernoulli":
            mask[:, where] = part < r
            continue
        count = round(r * part.shape[1])
        if count > 0:
            # the `count` smallest scores: a uniformly random subset of exactly `count` tokens
            mask[:, where] = torch.zeros_like(part, dtype=torch.bool).scatter_(1, part.argsort(dim=1)[:, :count], True)
    return mask


def token_times_to_pixels(model, token_times: torch.Tensor) -> torch.Tensor:
    """(B, N) per-token times → the sample's shape (B, C, H, W for images), constant on each token."""
    return model.expand_token_values(token_times)


def draw_dual_timesteps(config: SelfFlowConfig, batch: Batch, model) -> DualTimesteps:
    """Draw t, ε, s and the mask, in that order.

    t and ε come first, in flow matching's order, so that with r = 0 a Self-Flow step sees exactly
    the noise a flow-matching step with the same seed sees (tests/test_self_flow.py checks it).
    """
    x0 = batch.x0
    t = draw_time(config, batch)
    noise = batch.random.randn(*x0.shape[1:]).to(x0.device)
    s = draw_time(config, batch)
    groups = [(where, mask_ratio(config, modality)) for modality, where in model.token_groups()]
    mask = draw_mask(batch, model.num_tokens, config.mask_ratio, config.mask_mode, groups)
    token_times = torch.where(mask, s[:, None], t[:, None])  # (B, N)
    return DualTimesteps(
        t=t,
        s=s,
        mask=mask,
        token_times=token_times,
        pixel_times=token_times_to_pixels(model, token_times),
        noise=noise,
        teacher_times=token_times.min(dim=1).values,
    )


def representation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all (b, i) of 1 − cos(prediction[b, i], target[b, i]); inputs (B, N, D)."""
    cos = F.cosine_similarity(prediction.float(), target.float(), dim=-1, eps=1e-6)  # (B, N)
    return (1.0 - cos).mean()


class ProjectionHead(nn.Sequential):
    """Linear D→2D, SiLU, Linear 2D→D (Self-Flow's head on the student's hidden states)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))


@register
class SelfFlow(Method):
    name = "self_flow"
    Config = SelfFlowConfig

    def __init__(self, config: SelfFlowConfig, model):
        super().__init__(config, model)
        student, teacher = default_layers(model.depth)
        self.student_layer = config.student_layer or student
        self.teacher_layer = config.teacher_layer or teacher
        for key, value in (("student_layer", self.student_layer), ("teacher_layer", self.teacher_layer)):
            if value > model.depth:
                raise ConfigError(f"method.{key}={value} but the model has only {model.depth} blocks")
        # γ = 0 (dual-timestep only) has no representation term: no head, no teacher pass.
        self.head = ProjectionHead(model.hidden_size) if config.rep_weight > 0 else None
        self._teacher: list[nn.Module] = []  # a plain list: the teacher stays out of the module tree

    @property
    def uses_teacher(self) -> bool:
        return self.head is not None

    def bind_teacher(self, teacher: nn.Module) -> None:
        self._teacher[:] = [teacher]

    @property
    def teacher(self) -> nn.Module:
        if not self._teacher:
            raise RuntimeError("Self-Flow needs a teacher: call method.bind_teacher(ema_model) first (the trainer does)")
        return self._teacher[0]

    def draw(self, model, batch: Batch) -> tuple[torch.Tensor, DualTimesteps]:
        """(labels after dropout (B,), the dual timesteps, mask and noise)."""
        y = self.drop_labels(batch.y, self.config.class_dropout_prob, model.num_classes, batch.random)
        return y, draw_dual_timesteps(self.config, batch, model)

    def student_times(self, model, draw: DualTimesteps) -> torch.Tensor | TimeRows:
        """The student's per-token times in static shapes: K = 2 rows (t, s) per sample, the mask picking
        s; with every mask ratio 0 (single timestep) the (B,) times t, DiT's broadcast path."""
        if all(mask_ratio(self.config, modality) == 0 for modality, _ in model.token_groups()):
            return draw.t
        return TimeRows(torch.stack([draw.t, draw.s], dim=1), draw.mask.long())

    def compute(self, model, x0: torch.Tensor, drawn: tuple[torch.Tensor, DualTimesteps]):
        y, draw = drawn
        x_mixed = interpolate(x0, draw.noise, draw.pixel_times)
        target = velocity_target(x0, draw.noise)
        times = self.student_times(model, draw)
        if not self.uses_teacher:
            pred = model(x_mixed, times, y)
            loss_fm = (pred.float() - target).pow(2).mean()
            return loss_fm, {"loss_fm": loss_fm.detach()}

        pred, hiddens = model(x_mixed, times, y, return_layers=(self.student_layer,))
        loss_fm = (pred.float() - target).pow(2).mean()
        with torch.no_grad():
            # One time per sample: the teacher's modulation runs on B rows, and it stops at l_t.
            x_clean = interpolate(x0, draw.noise, draw.teacher_times)
            _, teacher_hiddens = self.teacher(x_clean, draw.teacher_times, y, stop_after=self.teacher_layer)
        loss_rep = representation_loss(self.head(hiddens[self.student_layer]), teacher_hiddens[self.teacher_layer])
        loss = loss_fm + self.config.rep_weight * loss_rep
        return loss, {"loss_fm": loss_fm.detach(), "loss_rep": loss_rep.detach()}

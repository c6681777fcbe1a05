"""Distribution matching distillation: DMD and DMD2 (docs/methods.md#dmd-and-dmd2).

Three networks:

* G, the generator — the trainer's model, started from the teacher (``train.init_from``) and used
  as a k-step map: G(ε, y) = ε − v_G(ε, 1, y) for k = 1, Euler over ``time_grid(k)`` otherwise;
* the real score — the frozen teacher (``method.teacher``, EMA weights) with classifier-free
  guidance ``real_cfg``; outside the module tree: not trained, not saved;
* the fake score — a DiT started from the teacher and trained (part of this method, saved in
  ``method.safetensors``) with flow matching on G's samples, detached.

The generator's loss, in x0 form (float32), for t ~ U[t_min, t_max] and fresh ε':

    x_t = (1 − t)·x + t·ε',  x̂0 = x_t − t·v,  g = (x̂0_fake − x̂0_real) / mean_{C,H,W}|x − x̂0_real|
    L_G = ½·mean((x − sg(x − g))²)          (∂L_G/∂x = g / numel: a step moves x from fake to real)

Both losses go into one backward pass: the fake score's predictions inside L_G run under
``no_grad`` and G's samples enter the fake loss detached, so neither loss leaks into the other
network. The two networks are then updated as DMD2's code does, by AdamW each with its own rate,
betas, weight decay and gradient clip (:meth:`Dmd.optimizer_groups`: the generator's group and
the fake score's + GAN head's), so the fake loss's larger gradients never scale G's step.

DMD v1's regression (``regression_weight`` > 0) reads (ε, x0) pairs of the real score — the
teacher's ODE solve at guidance ``real_cfg`` — checked in :meth:`Dmd.bind_data`.

DMD2 options: ``regression_weight = 0``; ``fake_updates_per_generator = r`` — G trains on steps
with step mod r = 0 only; on the other steps L_G is not computed, G's gradients stay None, AdamW
skips G and the trainer skips G's EMA (:meth:`Dmd.updates_generator`); a GAN head (a small MLP on
the mean-pooled tokens of the fake score's middle block) trained as the discriminator (non-
saturating: softplus(−D(real)) + softplus(D(fake))) with the fake score, while G gets
softplus(−D(G's sample)) through frozen copies of the fake score's and head's weights; few-step
generators with backward simulation: j ~ U{0..k−1}, G's own Euler path is run without gradients
to t_j, and the sample is G's x̂0 from there, x = x_{t_j} − t_j·v_G(x_{t_j}, t_j) — for j = k − 1
the k-step output itself, for j = 0 the one-step map — so every state `selfflow sample --steps k`
passes through is trained.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from selfflow.config import DmdConfig, Dmd2Config
from selfflow.methods import register
from selfflow.methods.base import Batch, Method, draw_time
from selfflow.methods.one_step import check_same_condition, copy_of, dmd_generator_loss, dmd_gradient, euler_steps, load_teacher, x0_estimate
from selfflow.path import interpolate, velocity_target
from selfflow.sampling import GuidedVelocity, time_grid


class GanHead(nn.Module):
    """Discriminator head: mean over tokens of a (B, N, D) hidden state → LayerNorm → MLP → logit (B,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.mean(dim=1)).squeeze(-1)


@register
class Dmd(Method):
    name = "dmd"
    Config = DmdConfig

    def __init__(self, config: DmdConfig, model, teacher: nn.Module | None = None):
        """``teacher``: the real-score DiT to use instead of loading ``config.teacher`` (tests)."""
        super().__init__(config, model)
        if teacher is None:
            teacher = load_teacher(config.teacher, "method.teacher")
        teacher = teacher.eval().requires_grad_(False)
        check_same_condition(model, teacher, f"method.teacher={config.teacher!r}")
        if getattr(model, "bank", None) is not None:  # text: the real score reads the student's captions
            teacher.set_bank(model.bank)
        if (teacher.in_channels, teacher.image_size, teacher.num_classes) != (model.in_channels, model.image_size, model.num_classes):
            from selfflow.errors import ConfigError

            raise ConfigError(f"method.teacher={config.teacher!r}: makes {teacher.in_channels}×{teacher.image_size}² images with "
                              f"{teacher.num_classes} classes, the model {model.in_channels}×{model.image_size}² with {model.num_classes}")
        self._teacher: list[nn.Module] = [teacher]  # frozen, outside the module tree
        self.fake = copy_of(teacher)
        self.gan_layer = config.gan_layer or max(1, teacher.depth // 2)
        if self.gan_layer > teacher.depth:
            from selfflow.errors import ConfigError

            raise ConfigError(f"method.gan_layer={self.gan_layer} but the teacher has {teacher.depth} blocks")
        self.use_gan = config.gan_generator_weight > 0 or config.gan_discriminator_weight > 0
        self.gan_head = GanHead(teacher.hidden_size) if self.use_gan else None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def bind_data(self, dataset) -> None:
        """DMD's regression needs pairs made by the real score: the teacher at guidance ``real_cfg``
        (its ODE's (ε, x0) coupling — generate-set refuses noise-injecting samplers)."""
        if self.config.regression_weight <= 0:
            return
        from selfflow.errors import ConfigError

        manifest = getattr(dataset, "manifest", None)
        if manifest is None or manifest.get("kind") != "pairs":
            raise ConfigError(f"method.regression_weight={self.config.regression_weight:g} needs the teacher's pairs: "
                              "data: {name: pairs, path: SET} (selfflow generate-set --kind pairs --cfg-scale REAL_CFG)")
        made_at = float(manifest.get("cfg_scale", 1.0))
        if self.teacher.num_classes and made_at != self.config.real_cfg:
            raise ConfigError(f"{getattr(dataset, 'source', 'data.path')}: pairs made at guidance {made_at:g}, but the real score "
                              f"uses method.real_cfg={self.config.real_cfg:g}; make them with --cfg-scale {self.config.real_cfg:g}")

    def optimizer_groups(self, model: nn.Module, train) -> list[dict]:
        """Two AdamW updates, each clipped on its own (DMD2's code): the generator's, and the fake
        score's with the GAN head's — so the fake loss's far larger gradients never scale G's step."""
        c = self.config

        def group(name, module, lr, beta1, beta2, weight_decay, clip):
            return {"name": name, "params": [p for p in module.parameters() if p.requires_grad], "lr": train.lr if lr is None else lr,
                    "betas": (beta1, beta2), "weight_decay": weight_decay, "clip": clip}

        return [group("generator", model, c.generator_lr, c.generator_beta1, c.generator_beta2, c.generator_weight_decay,
                      c.generator_grad_clip),
                group("fake", self, c.fake_lr, c.fake_beta1, c.fake_beta2, c.fake_weight_decay, c.fake_grad_clip)]

    def updates_generator(self, step: int) -> bool:
        return step % self.config.fake_updates_per_generator == 0

    @property
    def leaves_parameters_unused(self) -> bool:
        return self.config.fake_updates_per_generator > 1

    # ---- the generator --------------------------------------------------------------------
    def generate(self, model, noise: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """G's sample, differentiable in G: the k-step Euler map, or (backward simulation) G's x̂0
        from a random state of its own k-step path."""
        k = self.config.generator_steps
        if not self.config.backward_simulation:
            return euler_steps(model, noise, y, k)
        j = (batch.random.rand() * k).long().clamp_max(k - 1).to(noise.device)  # (B,) step index per sample
        times = time_grid(k).tolist()
        with torch.no_grad():  # G's own path, without gradients: the state at t_j of every sample
            x, states = noise, [noise]
            for i in range(k - 1):
                t = torch.full((x.shape[0],), times[i], dtype=torch.float32, device=x.device)
                x = x + (times[i + 1] - times[i]) * model(x, t, y).to(x.dtype)
                states.append(x)
            x_j = torch.stack(states)[j, torch.arange(x.shape[0], device=x.device)]
        t_j = torch.tensor(times, dtype=torch.float32, device=noise.device)[j]
        return x0_estimate(x_j, t_j, model(x_j, t_j, y)).to(noise.dtype)

    def _real_velocity(self, x_t, t, y):
        teacher = self.teacher
        first = next(iter(teacher.parameters()))
        if first.device != x_t.device:
            teacher.to(x_t.device)
        if self.config.real_cfg != 1.0 and teacher.num_classes:
            return GuidedVelocity(teacher, self.config.real_cfg, null_label=teacher.num_classes)(x_t, t, y)
        return teacher(x_t, t, y)

    def _frozen_fake(self, x, t, y, **kwargs):
        """The fake score with its weights detached: gradients reach the input only."""
        params = {name: p.detach() for name, p in self.fake.named_parameters()}
        return functional_call(self.fake, params, (x, t, y), kwargs)

    # ---- the loss -----------------------------------------------------------------------------
    def loss(self, model, batch: Batch):
        c = self.config
        x0_data = batch.x0
        y = self.drop_labels(batch.y, c.class_dropout_prob, model.num_classes, batch.random)
        shape = x0_data.shape[1:]
        device = x0_data.device
        noise = batch.random.randn(*shape).to(device)
        t_dmd = c.t_min + (c.t_max - c.t_min) * batch.random.rand().to(device)
        noise_dmd = batch.random.randn(*shape).to(device)
        t_fake = draw_time(c, batch)
        noise_fake = batch.random.randn(*shape).to(device)
        train_g = self.updates_generator(batch.step)
        logs: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)

        if train_g:
            x = self.generate(model, noise, y, batch)
        else:
            with torch.no_grad():
                x = self.generate(model, noise, y, batch)

        # the fake score: flow matching on G's samples (detached)
        x_det = x.detach()
        pred_fake = self.fake(interpolate(x_det, noise_fake, t_fake), t_fake, y)
        loss_fake = (pred_fake.float() - velocity_target(x_det, noise_fake)).pow(2).mean()
        total = total + c.fake_weight * loss_fake
        logs["loss_fake"] = loss_fake.detach()

        if train_g:
            x_t = interpolate(x.detach(), noise_dmd, t_dmd)
            with torch.no_grad():
                x0_real = x0_estimate(x_t, t_dmd, self._real_velocity(x_t, t_dmd, y))
                x0_fake = x0_estimate(x_t, t_dmd, self.fake(x_t, t_dmd, y))
                g = dmd_gradient(x, x0_fake, x0_real)
            loss_g = dmd_generator_loss(x, g)
            total = total + loss_g
            logs["loss_dmd"] = loss_g.detach()
            logs["dmd_grad_norm"] = g.flatten(1).norm(dim=1).mean()
            if c.regression_weight > 0:
                from selfflow.methods.reflow import require_pairs

                pair_noise = require_pairs(batch, self.name).to(device)
                loss_reg = (euler_steps(model, pair_noise, batch.y, c.generator_steps).float() - x0_data.float()).pow(2).mean()
                total = total + c.regression_weight * loss_reg
                logs["loss_regression"] = loss_reg.detach()

        if self.use_gan:
            t_gan = c.t_min + (c.t_max - c.t_min) * batch.random.rand().to(device)
            noise_gan = batch.random.randn(*shape).to(device)
            layer = self.gan_layer
            # discriminator: the fake score's backbone and the head, on real data and G's samples (detached)
            both = torch.cat([interpolate(x0_data, noise_gan, t_gan), interpolate(x_det, noise_gan, t_gan)])
            _, hidden = self.fake(both, torch.cat([t_gan, t_gan]), torch.cat([y, y]), stop_after=layer)
            logits_real, logits_fake = self.gan_head(hidden[layer]).float().chunk(2)
            loss_d = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
            total = total + c.gan_discriminator_weight * loss_d
            logs["loss_gan_d"] = loss_d.detach()
            if train_g:  # generator: through frozen copies of the backbone's and the head's weights
                _, hidden = self._frozen_fake(interpolate(x, noise_gan, t_gan), t_gan, y, stop_after=layer)
                head = {name: p.detach() for name, p in self.gan_head.named_parameters()}
                loss_gan_g = F.softplus(-functional_call(self.gan_head, head, (hidden[layer],)).float()).mean()
                total = total + c.gan_generator_weight * loss_gan_g
                logs["loss_gan_g"] = loss_gan_g.detach()
        return total, logs


@register
class Dmd2(Dmd):
    name = "dmd2"
    Config = Dmd2Config

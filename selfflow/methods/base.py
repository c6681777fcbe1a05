"""What every method shares: the batch it receives and the randomness it draws.

Label dropout and the time draws: docs/methods.md#labels-and-the-null-class, #training-times.

A method is a small ``nn.Module`` with ``loss(model, batch) → (loss, logs)``. Its own parameters
(Self-Flow's projection head, REPA's projector) are trained with the model and saved in
``method.safetensors``; they are never part of the exported generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from selfflow.path import sample_time


class BatchRandom:
    """Random draws for one micro-batch that do not depend on how the batch is split.

    Every process draws the values for the **global** micro-batch from the same generator and
    keeps its own rows, so a 2-process run sees exactly the noise of a 1-process run.
    """

    def __init__(self, generator: torch.Generator, global_batch: int, rows: slice):
        self.generator = generator
        self.global_batch = global_batch
        self.rows = rows

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def randn(self, *shape: int) -> torch.Tensor:
        """(local B, *shape) standard normal."""
        return torch.randn(self.global_batch, *shape, generator=self.generator, device=self.device)[self.rows]

    def rand(self, *shape: int) -> torch.Tensor:
        """(local B, *shape) uniform on [0, 1)."""
        return torch.rand(self.global_batch, *shape, generator=self.generator, device=self.device)[self.rows]


@dataclass
class Batch:
    x0: torch.Tensor  # (B, C, H, W) clean images in [-1, 1]
    y: torch.Tensor  # (B,) int64 labels; num_classes is the null label
    random: BatchRandom
    noise: Optional[torch.Tensor] = None  # (B, C, H, W) the stored ε of each pair (data.name: pairs), else None
    step: int = 0  # the optimizer step this batch trains (methods that alternate updates read it)


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and ``Config`` and implement :meth:`loss`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config, model: nn.Module):
        super().__init__()
        self.config = config

    @classmethod
    def build_network(cls, run) -> nn.Module:
        """The network the trainer trains and keeps an EMA of, from the resolved run config: the DiT
        (representation methods train an encoder instead)."""
        from selfflow.model import build_generator

        # the layout of a modality (video, audio, actions) or the image; a caption, an observation or labels
        return build_generator(run.model, text=getattr(run, "text", None), modality=getattr(run, "modality", None))

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Called by the trainer with its EMA model; methods that need a teacher keep it."""

    def bind_data(self, dataset) -> None:
        """Called by the trainer with its data set before the optimizer exists; methods that read more
        of the data than its batches (StableRep+'s caption texts) take it here, parameters included."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) of one micro-batch; a method with a split step is ``compute(draw(...))``."""
        if not self.splits_step:
            raise NotImplementedError
        return self.compute(model, batch.x0, self.draw(model, batch))

    # A split step: every random number first (eager), then the rest as a pure function of them, which
    # the trainer compiles whole with fullgraph=True — the draws stay bit-identical to eager ones, and
    # the compiled part sees static shapes and no generator (docs/methods.md#compiling-the-step).
    def draw(self, model: nn.Module, batch: Batch):
        """Every random number of the step (label dropout, times, noise, masks), from ``batch.random``."""
        raise NotImplementedError

    def compute(self, model: nn.Module, x0: torch.Tensor, drawn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) from the clean batch x0 (B, C, H, W) and :meth:`draw`'s output: no random
        draws, no host synchronisation, shapes fixed by the batch — one graph under torch.compile."""
        raise NotImplementedError

    @property
    def splits_step(self) -> bool:
        """True when the method implements :meth:`draw` and :meth:`compute` (the trainer then compiles
        :meth:`compute` alone, with fullgraph=True)."""
        return type(self).compute is not Method.compute

    def optimizer_groups(self, model: nn.Module, train) -> list[dict]:
        """The trained parameters in AdamW parameter groups, each with its own ``lr``, ``betas``,
        ``weight_decay`` and gradient-norm ``clip`` (0: none), and a ``name`` for the log. AdamW's update
        is per parameter, so each group is exactly an AdamW of its own. Default: one group, ``train``'s."""
        params = [p for p in list(model.parameters()) + list(self.parameters()) if p.requires_grad]
        return [{"name": "all", "params": params, "lr": train.lr, "betas": (train.beta1, train.beta2),
                 "weight_decay": train.weight_decay, "clip": train.grad_clip}]

    def updates_generator(self, step: int) -> bool:
        """Whether step ``step`` trains the model (the generator); when not, the trainer leaves its EMA alone."""
        return True

    @property
    def leaves_parameters_unused(self) -> bool:
        """True when some steps train only part of the parameters (DMD2's fake-score-only steps):
        DDP must then look for parameters without a gradient (``find_unused_parameters``)."""
        return False

    def drop_labels(self, y: torch.Tensor, probability: float, num_classes: int, random: BatchRandom) -> torch.Tensor:
        """Label dropout for classifier-free guidance: each label → null with ``probability``.

        An unconditional model (``num_classes == 0``) sees only the null label, whatever the data's labels.
        A vector condition (floating point: a policy's observation) is never dropped."""
        if y.is_floating_point():
            return y
        if num_classes == 0:
            return torch.zeros_like(y)
        if probability <= 0:
            return y
        drop = random.rand().to(y.device) < probability
        return torch.where(drop, torch.full_like(y, num_classes), y)


def draw_time(config, batch: Batch) -> torch.Tensor:
    """(local B,) training times from ``config.time_distribution``, drawn for the global batch."""
    gen = batch.random.generator
    t = sample_time(batch.random.global_batch, config.time_distribution, gen, gen.device, config.logit_mean, config.logit_std)
    return t[batch.random.rows].to(batch.x0.device)


class Objective(nn.Module):
    """Model + method in one module, so DDP/FSDP see (and synchronise) every trained parameter.

    ``compute``: the method's :meth:`Method.compute` compiled (``torch.compile(method.compute, ...)``);
    the draws then run eagerly and the rest of the step as that one graph."""

    def __init__(self, model: nn.Module, method: Method, compute=None):
        super().__init__()
        self.model = model
        self.method = method
        self._compute = [compute] if compute is not None else []  # a plain list: not a submodule

    def forward(self, batch: Batch):
        if not self._compute:
            return self.method.loss(self.model, batch)
        return self._compute[0](self.model, batch.x0, self.method.draw(self.model, batch))

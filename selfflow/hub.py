"""Formats the ecosystem reads: a diffusers pipeline folder and a model card (docs/export.md).

``selfflow export --format diffusers`` writes what ``diffusers`` loads::

    model_index.json                          SelfFlowPipeline: transformer + scheduler
    transformer/config.json                   SelfFlowTransformer2DModel (a diffusers ModelMixin), our ModelConfig
    transformer/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json           FlowMatchEulerDiscreteScheduler, shift 1, 1000 train steps
    README.md                                 the model card

The scheduler is our convention: x_t = (1 − t)·x0 + t·ε, the network predicts v = ε − x0, and
``FlowMatchEulerDiscreteScheduler.step`` is x ← x + (σ_{i+1} − σ_i)·v, our Euler step, on the grid
σ_i = 1 − i/K (passed as ``sigmas``, the terminal 0 appended by the scheduler); the network's time is
the scheduler's timestep / 1000 = σ_i. Guidance is ours: v = v_∅ + w·(v_c − v_∅), the null label
last. So ``SelfFlowPipeline`` reproduces ``generate(sampler="euler")`` on the same noise.

``diffusers`` is an optional dependency (``pip install selfflow[diffusers]``): this module imports it
at the top, and only the export command and the pipeline's users import this module.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from selfflow.config import ModelConfig, SampleConfig, from_dict
from selfflow.errors import ConfigError
from selfflow.loader import LoadedGenerator
from selfflow.model import DiT

NUM_TRAIN_TIMESTEPS = 1000  # the scheduler's timestep = 1000·σ; our network's time t = σ


class SelfFlowTransformer2DModel(ModelMixin, ConfigMixin):
    """selfflow's DiT as a diffusers model: ``forward(sample, timestep, class_labels)`` with timestep in
    [0, 1000] (= 1000·t) returns the velocity v = ε − x0 (``.sample``). ``model`` holds our ModelConfig
    fields; ``sample`` the run's sampler settings (the pipeline's defaults)."""

    @register_to_config
    def __init__(self, model: Optional[dict] = None, sample: Optional[dict] = None):
        super().__init__()
        self.dit = DiT(from_dict(ModelConfig, dict(model or {}), "transformer/config.json:model"))

    @property
    def num_classes(self) -> int:
        return int(self.dit.num_classes)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1) / NUM_TRAIN_TIMESTEPS
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        velocity = self.dit(sample, t, class_labels)
        return ImagePipelineOutput(images=velocity) if return_dict else (velocity,)


def euler_sigmas(steps: int) -> list[float]:
    """σ_i = 1 − i/K, i = 0..K−1: our Euler grid (selfflow.sampling.time_grid) without its terminal 0."""
    return [1.0 - i / steps for i in range(steps)]


class SelfFlowPipeline(DiffusionPipeline):
    """Class-conditional or unconditional image generation with a selfflow transformer and diffusers'
    ``FlowMatchEulerDiscreteScheduler``. ``output_type``: ``"pt"`` (N, C, H, W) in [0, 1], ``"np"`` /
    ``"pil"`` as diffusers, ``"raw"``: the sampler's state in [−1, 1] units, unclipped."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: SelfFlowTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: Union[None, int, Sequence[int], torch.Tensor] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, generator=None, latents: Optional[torch.Tensor] = None,
                 batch_size: int = 1, output_type: str = "pt", return_dict: bool = True):
        dit = self.transformer.dit
        defaults = dict(self.transformer.config.sample or {})
        steps = int(num_inference_steps or defaults.get("steps", 50))
        scale = float(defaults.get("cfg_scale", 1.0) if guidance_scale is None else guidance_scale)
        device = self._execution_device
        shape = (dit.in_channels, dit.image_size, dit.image_size)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            batch_size = len(class_labels)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor((batch_size, *shape), generator=generator, device=device, dtype=torch.float32)
        x = latents.to(device, torch.float32)
        if class_labels is None and dit.num_classes > 0:
            raise ValueError("this model is class-conditional: pass class_labels")
        labels = None if class_labels is None else class_labels.to(device)
        guided = scale != 1.0
        if guided and labels is None:
            raise ValueError("guidance_scale != 1 needs class_labels (a class-conditional model)")
        self.scheduler.set_timesteps(sigmas=euler_sigmas(steps), device=device)
        for timestep in self.progress_bar(self.scheduler.timesteps):
            if guided:
                null = torch.full_like(labels, dit.num_classes)
                both = self.transformer(torch.cat([x, x]), timestep, torch.cat([labels, null])).images
                v_cond, v_null = both.float().chunk(2)
                velocity = v_null + scale * (v_cond - v_null)
            else:
                velocity = self.transformer(x, timestep, labels).images.float()
            x = self.scheduler.step(velocity, timestep, x).prev_sample
        if output_type == "raw":
            images = x
        else:
            images = (x.clamp(-1, 1) + 1) / 2
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def diffusers_pipeline(loaded: LoadedGenerator, settings: SampleConfig) -> SelfFlowPipeline:
    """The pipeline of an image generator (class-label or unconditional, pixels)."""
    if loaded.kind != "image":
        raise ConfigError(f"--format diffusers: {loaded.folder} is a {loaded.kind} model; the diffusers pipeline "
                          f"takes class-label or unconditional image models (export it with --format selfflow)")
    data = (loaded.run or {}).get("data") or loaded.meta.get("data") or {}
    if data.get("name") == "latents":
        raise ConfigError(f"--format diffusers: {loaded.folder} generates autoencoder latents; the pipeline "
                          f"generates pixels (export it with --format selfflow)")
    transformer = SelfFlowTransformer2DModel(model=dataclasses.asdict(loaded.model.config), sample=dataclasses.asdict(settings))
    transformer.dit.load_state_dict(loaded.model.state_dict())
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    return SelfFlowPipeline(transformer=transformer.eval(), scheduler=scheduler)


def save_diffusers(loaded: LoadedGenerator, directory: Union[str, Path], settings: SampleConfig, card: str) -> Path:
    """Write the diffusers folder (module docstring) atomically."""
    from selfflow.files import atomic_directory

    pipeline = diffusers_pipeline(loaded, settings)
    with atomic_directory(directory) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = ["selfflow.hub", "SelfFlowTransformer2DModel"]  # where diffusers imports the class from
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
    return Path(directory)


def load_pipeline(directory: Union[str, Path], device: Union[str, torch.device] = "cpu") -> SelfFlowPipeline:
    """``SelfFlowPipeline.from_pretrained(directory)`` on ``device``."""
    return SelfFlowPipeline.from_pretrained(str(directory)).to(device)

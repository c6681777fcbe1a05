"""The ``train`` section: steps, batch, optimiser, precision, devices, checkpoints, logging (selfflow.trainer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from selfflow.config.fields import check_choice
from selfflow.errors import ConfigError


PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED_MODES = ("ddp", "fsdp")
# torch.compile modes: reduce-overhead adds CUDA graphs, max-autotune searches kernels (and adds CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")


def check_device(value: str, where: str) -> None:
    """auto | cpu | cuda | cuda:N (N a non-negative integer)."""
    if value in ("auto", "cpu", "cuda"):
        return
    if value.startswith("cuda:") and value[5:].isdigit():
        return
    raise ConfigError(f"{where}: unknown value {value!r}; choose one of {', '.join(DEVICE_NAMES)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    ema_half_life_images: Optional[float] = None  # if set, overrides ema_decay (batch-size free)
    ema_warmup: bool = True  # decay_k = min(decay, (1 + k) / (10 + k))
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp  (used when launched with torchrun)
    out_dir: str = "runs/default"
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 500  # 0: only at the end
    keep_last: int = 2
    time_limit_minutes: Optional[float] = None  # stop (with a checkpoint) after this much training time
    init_from: Optional[str] = None  # start model and EMA from this checkpoint/run/exported folder's EMA weights (resume wins)
    num_sample_images: int = 64
    tensorboard: bool = True
    loggers: tuple[str, ...] = ()  # more loggers beside metrics.jsonl and TensorBoard: wandb (pip install selfflow[wandb]; off by default)
    progress: bool = True
    num_workers: int = 0  # streamed data (folder | webdataset | hf): torch.utils.data workers decoding ahead; 0 decodes in the loop

    def validate(self, where: str) -> None:
        positive = ("steps", "batch_size", "grad_accum", "lr", "log_every", "keep_last")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "sample_every", "ckpt_every", "weight_decay", "grad_clip", "num_sample_images", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(f"{where}.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"{where}.time_limit_minutes must be positive, got {self.time_limit_minutes}")
        if self.ema_half_life_images is not None and self.ema_half_life_images <= 0:
            raise ConfigError(f"{where}.ema_half_life_images must be positive, got {self.ema_half_life_images}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{where}.{key} must be in [0, 1), got {getattr(self, key)}")
        check_choice(self.precision, PRECISIONS, f"{where}.precision")
        check_choice(self.distributed, DISTRIBUTED_MODES, f"{where}.distributed")
        check_choice(self.compile_mode, COMPILE_MODES, f"{where}.compile_mode")
        for name in self.loggers:
            check_choice(name, LOGGERS, f"{where}.loggers")
        check_device(self.device, f"{where}.device")
        if not self.out_dir.strip():
            raise ConfigError(f"{where}.out_dir must name a folder, got {self.out_dir!r}")


LOGGERS = ("wandb",)  # train.loggers: optional loggers beside metrics.jsonl (always) and TensorBoard (train.tensorboard)

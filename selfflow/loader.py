"""One loader for every generator folder: a run folder (its newest checkpoint), a training checkpoint
or an exported model folder, of any kind. ``config.json`` says what the folder holds
(:func:`selfflow.model.read_kind`, the one place that decides):

    a ``modality`` section (top level or in ``run``)   → ``"modality"``: video, audio, audio-video, a policy
    a ``text`` section (top level or in ``run``)       → ``"text"``: caption-conditioned images
    neither                                            → ``"image"``: class-conditional or unconditional images

:func:`load_model` opens the folder once (:func:`selfflow.model.open_folder`), builds the one network
class configured by the folder's sections and loads the chosen weights strictly
(:func:`selfflow.model.load_network`), and returns it with everything saved beside it. Every command
that reads a generator goes through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from selfflow.config import ModalityConfig, TextConfig
from selfflow.errors import USER_ERRORS, CheckpointError
from selfflow.model import GENERATOR_KINDS, WEIGHTS, open_folder, read_kind  # noqa: F401  (re-exported)
from selfflow.model import load_network, modality_section, text_section

# what each command that reads one kind says about a folder of another kind
WRONG_KIND = {
    ("image", "text"): "a caption-conditioned model (text section in config.json); sample it with selfflow sample --prompt "
                       "(this command takes class-label models)",
    ("image", "modality"): "a video/audio/action model (modality section in config.json); sample it with selfflow modality sample",
    ("text", "image"): "a class-label model, not a caption-conditioned one (no text section in config.json)",
    ("text", "modality"): "a video/audio/action model, not a caption-conditioned one (modality section in config.json)",
    ("modality", "image"): "not a modality model (no modality section in config.json); sample image models with selfflow sample",
    ("modality", "text"): "not a modality model (a caption-conditioned one); sample it with selfflow sample --prompt",
}
CAPTIONED_VIDEO = ("a caption-conditioned video model (text and modality sections in config.json); sample it with "
                   "selfflow sample --prompt")


@dataclass
class LoadedGenerator:
    """A generator network and what its folder says about it."""

    model: nn.Module
    folder: Path  # the checkpoint or exported folder the weights came from
    kind: str  # one of GENERATOR_KINDS
    weights: Path  # the safetensors file that was loaded
    meta: dict = field(repr=False)  # config.json as read
    text: Optional[TextConfig] = None  # a caption model (kind "text", or a text-to-video "modality"): its caption encoder
    modality: Optional[ModalityConfig] = None  # kind "modality": the layout and condition
    run: Optional[dict[str, Any]] = field(default=None, repr=False)  # the run's resolved config (training checkpoints)


def folder_kind(path: str | Path) -> Optional[str]:
    """The kind of generator in ``path``; None when the folder cannot be read (the loader says why)."""
    try:
        return read_kind(open_folder(path)[1])
    except (OSError, ValueError, *USER_ERRORS):
        return None


def load_model(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
               expect: Optional[str] = None) -> LoadedGenerator:
    """The generator in ``path`` (run, checkpoint or exported folder) in eval mode on ``device``;
    ``expect`` (a kind) refuses a folder of another kind with one line saying what it holds."""
    folder, meta, file = open_folder(path, weights)
    run = meta.get("run") if isinstance(meta.get("run"), dict) else None
    kind = read_kind(meta)
    where = folder / "config.json"
    text = text_section(meta, where)
    captioned_video = kind == "modality" and text is not None  # sampled from prompts, as a caption model is
    if expect is not None and (kind != expect or captioned_video) and not (expect == "text" and captioned_video):
        raise CheckpointError(f"{folder}: {CAPTIONED_VIDEO if captioned_video else WRONG_KIND[(expect, kind)]}")
    model = load_network(meta, where, file)  # one class; the folder's sections pick its layout and condition
    return LoadedGenerator(model.to(device).eval(), folder, kind, file, meta, text=text,
                           modality=modality_section(meta, where), run=run)

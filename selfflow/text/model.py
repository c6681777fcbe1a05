"""The caption-conditioned generator (docs/methods.md#text-to-image): :class:`selfflow.model.DiT` with a
caption :class:`~selfflow.model.Condition` — cross-attention to the caption's tokens in every block.

Per block, between self-attention and the MLP (PixArt-α's place):

    h ← h + gate1 · SelfAttn(modulate(LN(h)))
    h ← h + CrossAttn(LN(h), [r; W_k·LN(e_1..e_L)])        queries: the tokens; keys/values: text tokens
    h ← h + gate2 · MLP(modulate(LN(h)))

r is a learned register token every sample attends to, so the null caption (no text tokens) is a
well-defined softmax over r alone; CrossAttn's output projection starts at zero, so a fresh text
model is exactly the label model it extends. The pooled embedding replaces the label embedding in the
adaLN conditioning: ``c = time_embed(t) + MLP(pooled)``; the null caption uses a learned ``c_∅``.

The condition ``y`` is either a :class:`TextEmbedding` (+ optional null flags) or int64 indices into
the model's **caption bank** (``set_bank``; row K = ``num_classes`` is the null caption). The bank
makes a caption behave like a class label for everything built on labels: label dropout, classifier-
free guidance (``GuidedVelocity`` with null label K), per-sample labels in ``generate``. The bank
is plain tensors: data, not weights, and never enters a checkpoint.

The layers live in :mod:`selfflow.model`; this module builds and loads caption models by their text section.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from selfflow.config import ModelConfig, TextConfig
from selfflow.model import DiT, TextDiT  # noqa: F401  (TextDiT: the caption model's old name, a factory of DiT)
from selfflow.model import build_generator, text_section


def text_config_of(folder: Path) -> Optional[TextConfig]:
    """The ``text`` section of a training checkpoint's or an exported text model's config.json (None: a label model)."""
    from selfflow.checkpoint import read_json

    return text_section(read_json(folder / "config.json"), folder / "config.json")


def build_text_model(config: ModelConfig, text: TextConfig) -> DiT:
    return build_generator(config, text=text)


def load_text_generator(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> tuple[DiT, Path, TextConfig]:
    """(caption model, folder, text config) from a checkpoint, run or exported folder (:func:`selfflow.loader.load_model`)."""
    from selfflow.loader import load_model

    loaded = load_model(path, weights, device, expect="text")
    return loaded.model, loaded.folder, loaded.text

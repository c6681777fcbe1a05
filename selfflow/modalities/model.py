"""The token generator: :class:`selfflow.model.DiT` over any :class:`~selfflow.modalities.tokens.Layout`.

What a layout changes from the image model (docs/modalities.md#the-token-dit), and nothing else:

- each part embeds its tokens with its own linear map (for images the DiT's patch convolution is the
  same map) and decodes them with its own final layer;
- positions: the n-D sine-cosine table of each part's grid (space-time for video, frequency-time for
  spectrograms, time for action chunks), plus a learned modality embedding when several parts share
  the sequence;
- the condition is a class label (the DiT's label table, last row null) or, for a policy, a vector
  (the observation) through a two-layer MLP, or rendered frames through :class:`ImageObservation`.

The per-token times, the distinct-time conditioning, the blocks and ``return_layers``/``stop_after``
are the one class's, so Self-Flow, flow matching, the samplers and the trainer use it unchanged. This
module builds and loads token models by their modality section.
"""
from __future__ import annotations

from pathlib import Path

import torch

from selfflow.model import DiT, ImageObservation, TokenDiT, build_token_model  # noqa: F401  (TokenDiT: the old name, a factory of DiT)


def is_modality_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (checkpoint, run or exported folder) holds a modality model; False when unreadable
    (the loader that runs next says what is wrong)."""
    from selfflow.loader import folder_kind

    return folder_kind(path) == "modality"


def load_token_generator(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """(token model, folder, ModalityConfig, run config dict or None) from a checkpoint, run or exported folder."""
    from selfflow.loader import load_model

    loaded = load_model(path, weights, device, expect="modality")
    return loaded.model, loaded.folder, loaded.modality, loaded.run

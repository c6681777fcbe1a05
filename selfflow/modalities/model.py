"""The token DiT: the image DiT's blocks on any :class:`~selfflow.modalities.tokens.Layout` of tokens.

What changes from the image DiT (docs/modalities.md#the-token-dit), and nothing else:

- each part embeds its tokens with its own linear map (for images the DiT's patch convolution is the
  same map) and decodes them with its own final layer;
- positions: the n-D sine-cosine table of each part's grid (space-time for video, frequency-time for
  spectrograms, time for action chunks), plus a learned modality embedding when several parts share
  the sequence;
- the condition is a class label (the DiT's label table, last row null) or, for a policy, a vector
  (the observation) through a two-layer MLP.

The per-token times, the distinct-time conditioning, the blocks and ``return_layers``/``stop_after``
are the DiT's own, so Self-Flow, flow matching, the samplers and the trainer use it unchanged.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from selfflow.config import ModalityConfig, ModelConfig, from_dict
from selfflow.model import Block, DiT, FinalLayer, TimeEmbedding, init_transformer
from selfflow.modalities.tokens import Layout, sincos_nd


class TokenDiT(DiT):
    """``forward(x, t, y)``: x (B, *layout.sample_shape); t (B,) or (B, N); y (B,) int64 labels
    (``num_classes`` = null) or, with ``cond_dim > 0``, (B, cond_dim) float observations."""

    def __init__(self, config: ModelConfig, layout: Layout, cond_dim: int = 0):
        nn.Module.__init__(self)
        if config.num_classes is None:
            raise ValueError("ModelConfig.num_classes must be set before building the model")
        self.config, self.layout, self.cond_dim = config, layout, cond_dim
        depth, dim, heads = config.resolved_dims()
        self.depth, self.hidden_size, self.num_heads = depth, dim, heads
        self.num_classes = 0 if cond_dim else config.num_classes
        self.num_tokens = layout.num_tokens
        self.sample_shape = layout.sample_shape
        self.activation_checkpointing = False
        self.dedupe_times = True

        self.embeds = nn.ModuleList([nn.Linear(p.token_dim, dim) for p in layout.parts])
        table = torch.cat([sincos_nd(dim, p.grid) for p in layout.parts])
        self.register_buffer("pos_embed", table[None], persistent=False)
        self.register_buffer("modality_index", layout.modality_index(), persistent=False)
        self.modality_embed = nn.Embedding(len(layout.parts), dim) if len(layout.parts) > 1 else None
        self.time_embed = TimeEmbedding(dim, scale=config.time_scale, shift=config.time_shift)
        if cond_dim:
            self.cond_embed = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        else:
            self.label_embed = nn.Embedding(self.num_classes + 1, dim)  # last row: the null label
        self.blocks = nn.ModuleList([Block(dim, heads, config.mlp_ratio) for _ in range(depth)])
        self.finals = nn.ModuleList([FinalLayer(dim, 1, p.token_dim) for p in layout.parts])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_transformer(self, self.finals, self._init_inputs)

    def _init_inputs(self) -> None:
        for table in (getattr(self, "label_embed", None), self.modality_embed):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)

    # patchify, unpatchify, token_groups, expand_token_values, token_times: the DiT's, over self.layout

    # ---- forward -----------------------------------------------------------------------------
    def _conditioning(self, t: torch.Tensor, y: torch.Tensor | None, batch: int):
        if self.cond_dim:
            if y is None:
                y = torch.zeros(batch, self.cond_dim, device=t.device)
            return self.time_conditioning(t, self.cond_embed(y.to(self.pos_embed.dtype)), batch)
        return super()._conditioning(t, y, batch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                return_layers: Sequence[int] = (), stop_after: int | None = None):
        B = x.shape[0]
        h = torch.cat([embed(tokens) for embed, tokens in zip(self.embeds, self.layout.tokens(x))], dim=1) + self.pos_embed
        if self.modality_embed is not None:
            h = h + self.modality_embed(self.modality_index)
        cond, index = self._conditioning(t, y, B)
        h, hiddens = self.run_blocks(h, (cond, index), return_layers, stop_after)
        if h is None:
            return None, hiddens
        outs = [final(h[:, where], cond, None if index is None else index[:, where])
                for final, where in zip(self.finals, self.layout.token_slices())]
        out = self.layout.untokens(outs)
        return (out, hiddens) if return_layers else out

    # ---- files -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, modality: ModalityConfig | None = None, run: dict | None = None) -> Path:
        """``model.safetensors`` + ``config.json`` with the model, its ``modality`` section and (when given)
        the run's config, whose sampler and data settings ``selfflow modality sample|eval`` read."""
        from selfflow.files import atomic_directory, save_tensors, write_json

        if modality is None:
            raise ValueError("TokenDiT.save_pretrained needs the run's modality section (it rebuilds the layout)")
        with atomic_directory(directory) as tmp:
            save_tensors(self.state_dict(), tmp / "model.safetensors")
            meta = {"model": dataclasses.asdict(self.config), "modality": dataclasses.asdict(modality)}
            write_json({**meta, "run": run} if run is not None else meta, tmp / "config.json")
        return Path(directory)


def build_token_model(model: ModelConfig, modality: ModalityConfig) -> TokenDiT:
    """The token DiT of a modality run (its layout and condition from the modality section)."""
    from selfflow.modalities.data import condition_dim, layout_for

    return TokenDiT(model, layout_for(modality), cond_dim=condition_dim(modality))


def is_modality_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (checkpoint, run or exported folder) holds a modality model; False when unreadable
    (the loader that runs next says what is wrong)."""
    from selfflow.errors import USER_ERRORS
    from selfflow.model import open_folder, read_kind

    try:
        return read_kind(open_folder(path)[1]) == "modality"
    except (OSError, ValueError, *USER_ERRORS):
        return False


def load_token_generator(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """(TokenDiT, folder, ModalityConfig, run config dict or None) from a checkpoint, run or exported folder."""
    from selfflow.checkpoint import CheckpointError, load_state_strict, load_tensors
    from selfflow.model import open_folder

    folder, meta, file = open_folder(path, weights)
    run = meta.get("run") if isinstance(meta.get("run"), dict) else None
    raw = meta.get("modality") or (run or {}).get("modality")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder}: not a modality model (no modality section in config.json); "
                              f"sample image models with selfflow sample")
    modality = from_dict(ModalityConfig, raw, f"{folder / 'config.json'}:modality")
    config = from_dict(ModelConfig, meta["model"], f"{folder / 'config.json'}:model")
    model = build_token_model(config, modality)
    load_state_strict(model, load_tensors(file, device="cpu"), file)
    return model.to(device).eval(), folder, modality, run

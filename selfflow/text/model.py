"""The text-conditioned DiT (docs/methods.md#text-to-image): the class-label DiT plus cross-attention to caption tokens.

Per block, between self-attention and the MLP (PixArt-α's place):

    h ← h + gate1 · SelfAttn(modulate(LN(h)))
    h ← h + CrossAttn(LN(h), [r; W_k·LN(e_1..e_L)])        queries: image tokens; keys/values: text tokens
    h ← h + gate2 · MLP(modulate(LN(h)))

r is a learned register token every sample attends to, so the null caption (no text tokens) is a
well-defined softmax over r alone; CrossAttn's output projection starts at zero, so a fresh text
model is exactly the DiT it extends. The pooled embedding replaces the label embedding in the
adaLN conditioning: ``c = time_embed(t) + MLP(pooled)``; the null caption uses a learned ``c_∅``.

The condition ``y`` is either a :class:`TextEmbedding` (+ optional null flags) or int64 indices into
the model's **caption bank** (``set_bank``; row K = ``num_classes`` is the null caption). The bank
makes a caption behave like a class label for everything built on labels: label dropout, classifier-
free guidance (``GuidedVelocity`` with null label K), per-sample labels in ``generate``. The bank
is a non-persistent buffer: it is data, not weights, and never enters a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.config import ModelConfig, TextConfig, from_dict
from selfflow.model import Block, DiT, init_transformer, modulate, rows_to_tokens
from selfflow.text.encoders import TextEmbedding, encoder_dim


class CrossAttention(nn.Module):
    """Image tokens (B, N, D) attend to context tokens (B, L, D) where ``mask`` (B, L) is True."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(context).reshape(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class TextBlock(Block):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__(dim, num_heads, mlp_ratio)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross = CrossAttention(dim, num_heads)

    def forward(self, x, cond, index, context=None, context_mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = rows_to_tokens(self.adaLN(cond), index, 6)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm_cross(x), context, context_mask)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class TextDiT(DiT):
    """``forward(x, t, y)`` with y: (B,) int64 bank indices (K = null), a :class:`TextEmbedding`, or None (null)."""

    conditions_on_text = True

    def __init__(self, config: ModelConfig, text_dim: int):
        super().__init__(dataclasses.replace(config, num_classes=0))
        dim = self.hidden_size
        del self.label_embed  # the caption's pooled embedding takes its place
        self.text_dim = int(text_dim)
        self.blocks = nn.ModuleList([TextBlock(dim, self.num_heads, config.mlp_ratio) for _ in range(self.depth)])
        self.text_pool = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_norm = nn.LayerNorm(text_dim, eps=1e-6)
        self.text_proj = nn.Linear(text_dim, dim)
        self.null_cond = nn.Parameter(torch.zeros(dim))
        self.register = nn.Parameter(torch.zeros(1, dim))
        self.bank: Optional[TextEmbedding] = None  # plain tensors: not weights, not buffers (the EMA copy never re-copies them)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The DiT's initialisation (:func:`selfflow.model.init_transformer`, same draws in the same order),
        then the text parts: cross-attention outputs at zero (a fresh text block is the DiT block), the null
        condition and the register token N(0, 0.02)."""
        if not hasattr(self, "text_pool"):  # DiT.__init__ calls this before the text parts exist
            return
        init_transformer(self, [self.final], self._init_inputs)
        for block in self.blocks:
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)
        nn.init.normal_(self.null_cond, std=0.02)
        nn.init.normal_(self.register, std=0.02)

    # ---- the caption bank ----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """The bank's size K: bank index K is the null caption (what label dropout and guidance use)."""
        bank = self.__dict__.get("bank")
        return 0 if bank is None else len(bank)

    @num_classes.setter
    def num_classes(self, value) -> None:  # DiT.__init__ stores the config's (zero) classes
        pass

    def set_bank(self, embedding: TextEmbedding) -> None:
        """Install the captions that indices 0..K-1 stand for (K = ``len(embedding)``)."""
        if embedding.pooled.shape[-1] != self.text_dim:
            raise ValueError(f"text embeddings have width {embedding.pooled.shape[-1]}, the model expects {self.text_dim}")
        device = self.patch_embed.weight.device
        self.bank = TextEmbedding(embedding.pooled.float().to(device), embedding.tokens.float().to(device), embedding.mask.bool().to(device))

    def condition_from(self, y, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled (B, Dt), tokens (B, L, Dt), mask (B, L), is_null (B,)) for the forms y may take."""
        if y is None:
            return (torch.zeros(batch, self.text_dim, device=device), torch.zeros(batch, 0, self.text_dim, device=device),
                    torch.zeros(batch, 0, dtype=torch.bool, device=device), torch.ones(batch, dtype=torch.bool, device=device))
        if isinstance(y, TextEmbedding):
            return y.pooled.to(device), y.tokens.to(device), y.mask.to(device), torch.zeros(batch, dtype=torch.bool, device=device)
        K, bank = self.num_classes, self.bank
        if K == 0:
            if bool((y != 0).any()):
                raise ValueError("caption indices given but the model has no caption bank (set_bank)")
            return self.condition_from(None, batch, device)
        is_null = (y >= K).to(device)
        rows = y.clamp(max=K - 1).to(bank.pooled.device)
        mask = bank.mask[rows].to(device) & ~is_null[:, None]
        return bank.pooled[rows].to(device), bank.tokens[rows].to(device), mask, is_null

    def forward(self, x, t, y=None, return_layers: Sequence[int] = (), stop_after: Optional[int] = None):
        B = x.shape[0]
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        pooled, tokens, mask, is_null = self.condition_from(y, B, x.device)
        dtype = self.text_proj.weight.dtype
        vector = torch.where(is_null[:, None], self.null_cond[None].to(dtype), self.text_pool(pooled.to(dtype)))
        context = torch.cat([self.register[None].expand(B, 1, -1), self.text_proj(self.text_norm(tokens.to(dtype)))], dim=1)
        context_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), mask], dim=1)
        cond, index = self.time_conditioning(t, vector, B)  # the caption vector replaces the label embedding
        h, hiddens = self.run_blocks(h, (cond, index, context, context_mask), return_layers, stop_after)
        if h is None:
            return None, hiddens
        out = self.unpatchify(self.final(h, cond, index))
        return (out, hiddens) if return_layers else out

    # ---- files -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, text: Optional[TextConfig] = None) -> Path:
        from selfflow.checkpoint import atomic_directory, save_tensors

        with atomic_directory(directory) as tmp:
            save_tensors(self.state_dict(), tmp / "model.safetensors")
            meta = {"model": dataclasses.asdict(self.config), "text_dim": self.text_dim}
            if text is not None:
                meta["text"] = dataclasses.asdict(text)
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        return Path(directory)


def text_config_of(folder: Path) -> Optional[TextConfig]:
    """The ``text`` section of a training checkpoint's or an exported text model's config.json (None: a label model)."""
    from selfflow.checkpoint import read_json

    meta = read_json(folder / "config.json")
    raw = meta.get("text") or (meta.get("run") or {}).get("text")
    return None if raw is None else from_dict(TextConfig, raw, f"{folder / 'config.json'}:text")


def build_text_model(config: ModelConfig, text: TextConfig) -> TextDiT:
    return TextDiT(config, encoder_dim(text.encoder, text.hashed_dim))


def load_text_generator(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> tuple[TextDiT, Path, TextConfig]:
    """(TextDiT, folder, text config) from a checkpoint, run or exported folder of a caption-conditioned model."""
    from selfflow.checkpoint import CheckpointError, load_state_strict, load_tensors
    from selfflow.model import open_folder

    folder, meta, file = open_folder(path, weights)
    text = text_config_of(folder)
    if text is None:
        raise CheckpointError(f"{folder}: a class-label model, not a caption-conditioned one (no text section in config.json)")
    config = from_dict(ModelConfig, meta["model"], f"{folder / 'config.json'}:model")
    state = load_tensors(file)
    check_text_width(text, state, folder / "config.json", file)
    model = build_text_model(config, text)
    load_state_strict(model, state, file)
    return model.to(device), folder, text


def check_text_width(text: TextConfig, state: dict, config_file: Path, weights_file: Path) -> None:
    """The text section's encoder must give embeddings as wide as the ones the weights read (``text_proj``'s input)."""
    from selfflow.checkpoint import CheckpointError

    weight = state.get("text_proj.weight")
    expected = encoder_dim(text.encoder, text.hashed_dim)
    if weight is not None and weight.ndim == 2 and weight.shape[1] != expected:
        named = f"text.encoder={text.encoder}" + (f", text.hashed_dim={text.hashed_dim}" if text.encoder == "hashed" else "")
        raise CheckpointError(f"{config_file}: {named} gives {expected}-d caption embeddings, but {weights_file.name} reads "
                              f"{weight.shape[1]}-d ones; the text section is not the one the model was trained with")

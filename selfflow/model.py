"""The network: one DiT/SiT transformer over a token layout with **per-token** adaLN-Zero modulation.

:class:`DiT` is every generator: a :class:`~selfflow.modalities.tokens.Layout` of tokens (an image is a
layout with one 2-D part; video, audio, audio-video and action chunks are others) and a pluggable
:class:`Condition` — class labels (or none), a caption read by cross-attention, an observation vector
(docs/methods.md#one-class-configured). :func:`build_generator` configures it from a run's sections.

Every token carries its own time. The conditioning of token i of sample b is
``c[b, i] = time_embed(t[b, i]) + label_embed(y[b])`` and each block modulates that token with
``shift, scale, gate = adaLN(c[b, i])`` (DiT's adaLN-Zero, evaluated per token; docs/methods.md#the-network).

Cost: the modulation MLP would run on B·N rows. A sample rarely has more than two distinct times
(Self-Flow: t and s; inference: one), so the conditioning is computed once per distinct
``(sample, time)`` pair and gathered back to tokens. With a (B,) time tensor this is exactly DiT.

Two ways to give per-token times: a (B, N) tensor, whose distinct times per sample are found at run
time (:func:`distinct_times`: data-dependent shapes), or :class:`TimeRows` — K time rows per sample
and each token's row, K fixed by the caller (Self-Flow: 2) — whose conditioning has static shapes, so
``torch.compile`` traces it into one graph (docs/methods.md#static-shape-conditioning). Both give the
same numbers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from selfflow.checkpoint import load_state_strict  # noqa: F401  (re-exported)
from selfflow.config import ModalityConfig, ModelConfig, TextConfig, from_dict
from selfflow.modalities.tokens import Layout, Part, sincos_nd
from selfflow.text.encoders import TextEmbedding


# --------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------
def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table, (grid_h·grid_w, embed_dim), row-major tokens:
    [sin x | cos x | sin y | cos y] (the n-D table of selfflow.modalities.tokens for two axes)."""
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {embed_dim}")
    return sincos_nd(embed_dim, (grid_h, grid_w))


class TimeEmbedding(nn.Module):
    """t ∈ [0, 1] → sinusoidal features of τ = shift + scale·t (native: 1000·t) → MLP → (R, D).

    Imported SiT/REPA weights embed τ = t, the Self-Flow release τ = 1 − t (selfflow.interop)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, scale: float = 1000.0, shift: float = 0.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale, self.shift = float(scale), float(shift)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (R,) -> (R, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        tau = self.scale * t.float()
        if self.shift != 0.0:
            tau = self.shift + tau
        args = tau[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def distinct_times(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ``(sample, time)`` pairs of per-token times t (B, N), ordered by sample, then time.

    Returns ``times`` (R,), ``sample`` (R,) and ``inverse`` (B, N) with ``times[inverse[b, i]] == t[b, i]``
    and ``sample[inverse[b, i]] == b`` — what ``torch.unique`` of the (sample, time) pairs along dim 0
    returns, from one sort along the token axis instead of a row-wise sort of B·N pairs.
    """
    B, N = t.shape
    values, order = t.sort(dim=1)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]  # first token of each distinct time in a sample
    rank = new.cumsum(dim=1) - 1  # (B, N): which distinct time of its sample, in sorted order
    counts = rank[:, -1] + 1  # distinct times per sample
    row_sorted = rank + (counts.cumsum(0) - counts)[:, None]
    inverse = torch.empty_like(row_sorted).scatter_(1, order, row_sorted)
    sample = torch.repeat_interleave(torch.arange(B, device=t.device), counts)
    return values[new], sample, inverse


class TimeRows(NamedTuple):
    """Per-token times as K time rows per sample plus each token's row: shapes fixed by K, not by data.

    ``times`` (B, K) float and ``index`` (B, N) int64 in [0, K): token i of sample b has time
    ``times[b, index[b, i]]``. Self-Flow: K = 2, ``times = (t, s)``, ``index = mask`` (1 where the token
    gets s). A row no token uses costs one extra modulation row and changes nothing else.
    """

    times: torch.Tensor  # (B, K)
    index: torch.Tensor  # (B, N) int64

    @property
    def device(self) -> torch.device:
        return self.times.device

    def per_token(self) -> torch.Tensor:
        """The (B, N) per-token times these rows stand for."""
        return self.times.gather(1, self.index)


def time_rows_conditioning(time_embed: nn.Module, rows: TimeRows, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning rows (B·K, D) = time_embed(times[b, k]) + label[b], ordered by sample then k, and
    each token's row ``b·K + index[b, i]`` (B, N): static shapes — no unique, sort or repeat_interleave."""
    B, K = rows.times.shape
    cond = (time_embed(rows.times.reshape(B * K)).view(B, K, -1) + label[:, None]).reshape(B * K, -1)
    first_row = torch.arange(B, device=rows.index.device)[:, None] * K  # (B, 1)
    return cond, rows.index + first_row


def rows_to_tokens(mod: torch.Tensor, index: torch.Tensor | None, parts: int) -> list[torch.Tensor]:
    """Split modulation rows (R, parts·D) into ``parts`` tensors and give every token its row.

    index None (one row per sample): (B, 1, D) parts that broadcast over the tokens, DiT's own path.
    index (B, N): (B, N, D) parts with ``part[b, i] = rows[index[b, i]]`` — the same values as
    ``mod[index].chunk(parts, -1)``; gathering each part with ``F.embedding`` after the split
    keeps the backward a row-wise accumulation into (R, D) per part, instead of materialising a
    (B, N, parts·D) gradient for the split and scattering it back with ``index_put``.
    """
    if index is None:
        return list(mod[:, None].chunk(parts, dim=-1))
    return [F.embedding(index, part) for part in mod.chunk(parts, dim=-1)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Tokens (B, N, D) attend to context tokens (B, L, D) where ``mask`` (B, L) is True."""

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


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero; ``mod`` is (B, N, 6D) or (B, 1, 6D).

    With ``cross`` (a caption condition) the tokens also attend to the caption between self-attention
    and the MLP (PixArt-α's place): ``h ← h + CrossAttn(LN(h), context)``, unmodulated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.cross = None
        if cross:
            self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross = CrossAttention(dim, num_heads)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (R, 6D): one row per distinct (sample, time) → six (B, N, D) or (B, 1, D) parts
        shift1, scale1, gate1, shift2, scale2, gate2 = rows_to_tokens(self.adaLN(cond), index, 6)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        shift, scale = rows_to_tokens(self.adaLN(cond), index, 2)
        return self.linear(modulate(self.norm(x), shift, scale))


class ImageObservation(nn.Module):
    """A window of rendered frames + proprioception, flattened (B, H·3·S·S + H·P) → (B, dim): each frame through
    3 stride-2 convolutions (3→16→32→32 channels, SiLU) flattened, the frames' features and the proprioception
    concatenated, then Linear, SiLU, Linear (Diffusion Policy's image + agent-state condition, with a small CNN)."""

    def __init__(self, frames: int, size: int, proprio: int, dim: int):
        super().__init__()
        self.frames, self.size, self.proprio = frames, size, proprio
        self.cnn = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.SiLU(),
                                 nn.Conv2d(32, 32, 4, 2, 1), nn.SiLU(), nn.Flatten())
        feature = 32 * (size // 8) ** 2
        self.mlp = nn.Sequential(nn.Linear(frames * (feature + proprio), dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        B, pixels = y.shape[0], self.frames * 3 * self.size * self.size
        images = y[:, :pixels].reshape(B * self.frames, 3, self.size, self.size)
        features = self.cnn(images).reshape(B, -1)
        return self.mlp(torch.cat([features, y[:, pixels:]], dim=1))


def init_transformer(model: nn.Module, finals: Sequence[FinalLayer], init_inputs: Callable[[], None]) -> None:
    """DiT's initialisation of what every flow transformer here shares: Xavier-uniform linear layers
    with zero biases, then the model's own input embeddings (``init_inputs``), N(0, 0.02) time-embedding
    weights, and adaLN-Zero — every block and final layer starts as the identity / zero output, so a
    fresh model predicts v = 0. (The order of the random draws is DiT's: a seed gives the same weights.)"""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    init_inputs()
    for layer in model.time_embed.mlp:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.02)
    for layer in [block.adaLN[-1] for block in model.blocks] + [l for f in finals for l in (f.adaLN[-1], f.linear)]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------
CONDITIONS = ("label", "caption", "observation")


@dataclass(frozen=True)
class Condition:
    """What the generator reads besides time: a per-sample vector added to the time embedding in every
    adaLN (``c = time_embed(t) + vector(y)``), and for a caption also the tokens every block cross-attends to.

    ``label``        y (B,) int64 in [0, classes]; ``classes`` is the null label (label dropout, guidance).
                     ``classes=0`` is the unconditional model (its table holds the null row only).
                     Layer ``label_embed`` (classes + 1, D).
    ``caption``      y a :class:`~selfflow.text.encoders.TextEmbedding`, (B,) int64 indices into the caption
                     bank (``set_bank``; index K = the null caption) or None; ``dim`` the text encoder's width.
                     ``vector = MLP(pooled)`` (a learned ``null_cond`` for the null caption); context: a learned
                     register token then ``text_proj(LN(tokens))`` (docs/methods.md#text-to-image).
    ``observation``  y (B, dim) float (a policy's observation), through a two-layer MLP ``cond_embed``, or, with
                     ``image = (frames, size, proprioception)``, through :class:`ImageObservation`.
    """

    kind: str = "label"
    classes: int = 0
    dim: int = 0
    image: Optional[tuple[int, int, int]] = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITIONS:
            raise ValueError(f"condition kind {self.kind!r}: expected one of {', '.join(CONDITIONS)}")
        if self.kind == "label" and self.classes < 0:
            raise ValueError(f"a label condition needs classes >= 0, got {self.classes}")
        if self.kind != "label" and self.dim <= 0:
            raise ValueError(f"a {self.kind} condition needs its width dim > 0, got {self.dim}")


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """The flow transformer, predicting the velocity ``v = ε − x0`` (docs/methods.md#conventions), over a
    token :class:`~selfflow.modalities.tokens.Layout` with a pluggable :class:`Condition`.

    ``forward(x, t, y)``: x (B, *layout.sample_shape) — an image (B, C, H, W); t (B,), (B, N) per-token
    times in the layout's token order, or :class:`TimeRows` (the same per-token times in static shapes);
    y the condition (:class:`Condition`; None: the null label, caption or a zero observation).

    ``DiT(config)`` is the image model of ``config``: a layout with one 2-D part ``(C, H, W)``, class labels
    (``num_classes``, 0 = unconditional). Its patches are embedded by a convolution and decoded by ``final``
    (SiT's layer names, which imported and published checkpoints use). ``DiT(config, layout)`` embeds each
    part with its own linear map (``embeds``; the same map as the convolution, on the patch's values in
    the layout's order) and decodes it with its own final layer (``finals``); several parts add a learned
    modality embedding. Everything else — positions, per-token times, blocks, conditions — is shared.
    """

    def __init__(self, config: ModelConfig, layout: Optional[Layout] = None, condition: Optional[Condition] = None):
        super().__init__()
        self.patch_conv = layout is None  # an image built from its config: SiT's patch convolution
        if self.patch_conv:
            if config.image_size is None or config.in_channels is None:
                raise ValueError("ModelConfig.image_size and in_channels must be set before building the model")
            if config.image_size % config.patch_size != 0:
                raise ValueError(f"image_size {config.image_size} is not divisible by patch_size {config.patch_size}")
            layout = Layout((Part("image", (config.in_channels, config.image_size, config.image_size),
                                  (config.patch_size, config.patch_size)),))
        if condition is None:
            if config.num_classes is None:
                raise ValueError("ModelConfig.num_classes must be set before building the model")
            condition = Condition("label", classes=config.num_classes)
        if condition.kind == "caption":  # the caption takes the label's place: the saved config says no classes
            config = dataclasses.replace(config, num_classes=0)
        self.config, self.layout, self.condition = config, layout, condition
        depth, dim, heads = config.resolved_dims()
        self.depth, self.hidden_size, self.num_heads = depth, dim, heads
        self.patch_size = config.patch_size
        self.in_channels, self.image_size = config.in_channels, config.image_size
        self.num_tokens = layout.num_tokens
        self.sample_shape = layout.sample_shape
        self.grid = layout.parts[0].grid[0] if self.patch_conv else None
        self.text_dim = condition.dim if condition.kind == "caption" else None
        self.cond_dim = condition.dim if condition.kind == "observation" else 0
        self.activation_checkpointing = False
        self.dedupe_times = True  # compute the conditioning once per distinct (sample, time)

        # tokens in: (the layer names of the old image / token models, so their checkpoints load unchanged)
        if self.patch_conv:
            self.patch_embed = nn.Conv2d(config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size)
        else:
            self.embeds = nn.ModuleList([nn.Linear(p.token_dim, dim) for p in layout.parts])
        # pos_embed "stored" (imported weights): the table is saved and loaded with the weights
        self.register_buffer("pos_embed", layout.position_table(dim)[None], persistent=config.pos_embed == "stored")
        self.modality_embed = None
        if len(layout.parts) > 1:
            self.register_buffer("modality_index", layout.modality_index(), persistent=False)
            self.modality_embed = nn.Embedding(len(layout.parts), dim)
        self.time_embed = TimeEmbedding(dim, scale=config.time_scale, shift=config.time_shift)
        # the condition's vector (a caption's layers follow the blocks: the text model's parameter order)
        if condition.kind == "label":
            self.label_embed = nn.Embedding(condition.classes + 1, dim)  # last row: the null label
        elif condition.kind == "observation":
            self.cond_embed = (ImageObservation(*condition.image, dim) if condition.image else
                               nn.Sequential(nn.Linear(condition.dim, dim), nn.SiLU(), nn.Linear(dim, dim)))
        caption = condition.kind == "caption"
        self.blocks = nn.ModuleList([Block(dim, heads, config.mlp_ratio, cross=caption) for _ in range(depth)])
        # tokens out
        if self.patch_conv:
            self.final = FinalLayer(dim, config.patch_size, config.in_channels)
        else:
            self.finals = nn.ModuleList([FinalLayer(dim, 1, p.token_dim) for p in layout.parts])
        if caption:
            self.text_pool = nn.Sequential(nn.Linear(condition.dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.text_norm = nn.LayerNorm(condition.dim, eps=1e-6)
            self.text_proj = nn.Linear(condition.dim, dim)
            self.null_cond = nn.Parameter(torch.zeros(dim))
            self.register = nn.Parameter(torch.zeros(1, dim))
        self.bank: Optional[TextEmbedding] = None  # plain tensors: not weights, not buffers (the EMA copy never re-copies them)
        self.reset_parameters()

    @property
    def conditions_on_text(self) -> bool:
        return self.condition.kind == "caption"

    @property
    def num_classes(self) -> int:
        """The null label: the label count, a caption model's bank size K (bank index K is the null caption,
        what label dropout and guidance use), 0 for an observation."""
        if self.condition.kind == "caption":
            return 0 if self.bank is None else len(self.bank)
        return self.condition.classes if self.condition.kind == "label" else 0

    def finals_list(self) -> list[FinalLayer]:
        return [self.final] if self.patch_conv else list(self.finals)

    def reset_parameters(self) -> None:
        """DiT's initialisation (:func:`init_transformer`); a caption's cross-attention outputs start at zero
        (a fresh caption block is the plain block), its null condition and register token N(0, 0.02)."""
        init_transformer(self, self.finals_list(), self._init_inputs)
        if self.conditions_on_text:
            for block in self.blocks:
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
            nn.init.normal_(self.null_cond, std=0.02)
            nn.init.normal_(self.register, std=0.02)

    def _init_inputs(self) -> None:
        if self.patch_conv:
            w = self.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.bias)
        for table in (getattr(self, "label_embed", None), self.modality_embed):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)

    # ---- tokens <-> samples: one implementation, the layout's (selfflow.modalities.tokens) ------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *sample_shape) → (B, N, d) for a one-part layout; for an image (B, C, H, W) →
        (B, N, p·p·C), row-major tokens, each patch's values in (p, p, C) order."""
        if len(self.layout.parts) != 1:
            raise ValueError("patchify needs a one-part layout; use model.layout.tokens(x) for several parts")
        return self.layout.tokens(x)[0]

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`patchify`."""
        return self.layout.untokens([tokens])

    def token_groups(self) -> list[tuple[str, slice]]:
        """(modality, token range) of each part of the sequence (an image model: one part)."""
        return [(p.name, where) for p, where in zip(self.layout.parts, self.layout.token_slices())]

    def expand_token_values(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N) one value per token (a time) → (B, *sample_shape), constant on each token's values."""
        return self.layout.expand_token_values(values)

    def token_times(self, t_sample: torch.Tensor) -> torch.Tensor:
        """A time map constant on tokens → per-token times (B, N): (B, *sample_shape), or for a one-part
        layout also one channel (B, 1, *spatial)."""
        if len(self.layout.parts) == 1 and t_sample.shape[1] == 1:
            t_sample = t_sample.expand(t_sample.shape[0], *self.layout.sample_shape)
        return torch.cat([tokens[..., 0] for tokens in self.layout.tokens(t_sample)], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (B, *sample_shape) → tokens (B, N, D) with their positions (and parts)."""
        if self.patch_conv:
            return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        h = torch.cat([embed(tokens) for embed, tokens in zip(self.embeds, self.layout.tokens(x))], dim=1) + self.pos_embed
        if self.modality_embed is not None:
            h = h + self.modality_embed(self.modality_index)
        return h

    def decode(self, h: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Tokens (B, N, D) → velocity (B, *sample_shape): each part through its own final layer."""
        finals = self.finals_list()
        if len(finals) == 1:
            return self.layout.untokens([finals[0](h, cond, index)])
        return self.layout.untokens([final(h[:, where], cond, None if index is None else index[:, where])
                                     for final, where in zip(finals, self.layout.token_slices())])

    # ---- conditioning --------------------------------------------------------------------
    def set_bank(self, embedding: TextEmbedding) -> None:
        """A caption model: install the captions that indices 0..K-1 stand for (K = ``len(embedding)``)."""
        if not self.conditions_on_text:
            raise ValueError("set_bank: this model is not caption-conditioned")
        if embedding.pooled.shape[-1] != self.text_dim:
            raise ValueError(f"text embeddings have width {embedding.pooled.shape[-1]}, the model expects {self.text_dim}")
        device = self.pos_embed.device
        self.bank = TextEmbedding(embedding.pooled.float().to(device), embedding.tokens.float().to(device), embedding.mask.bool().to(device))

    def condition_from(self, y, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A caption model: (pooled (B, Dt), tokens (B, L, Dt), mask (B, L), is_null (B,)) for the forms y may take."""
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

    def condition_vector(self, y, batch: int, device) -> tuple[torch.Tensor, tuple]:
        """(the condition's vector (B, D), the extra block arguments: a caption's (context (B, 1+L, D),
        context mask (B, 1+L)), else none)."""
        kind = self.condition.kind
        if kind == "label":
            if y is None:
                y = torch.full((batch,), self.condition.classes, dtype=torch.long, device=device)
            return self.label_embed(y), ()
        if kind == "observation":
            if y is None:
                y = torch.zeros(batch, self.cond_dim, device=device)
            return self.cond_embed(y.to(self.pos_embed.dtype)), ()
        pooled, tokens, mask, is_null = self.condition_from(y, batch, device)
        dtype = self.text_proj.weight.dtype
        vector = torch.where(is_null[:, None], self.null_cond[None].to(dtype), self.text_pool(pooled.to(dtype)))
        context = torch.cat([self.register[None].expand(batch, 1, -1), self.text_proj(self.text_norm(tokens.to(dtype)))], dim=1)
        context_mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), mask], dim=1)
        return vector, (context, context_mask)

    def _conditioning(self, t: torch.Tensor | TimeRows, y, batch: int):
        """Return (cond rows (R, D), index (B, N) into the rows, or None when t is per sample)."""
        return self.time_conditioning(t, self.condition_vector(y, batch, t.device)[0], batch)

    def time_conditioning(self, t: torch.Tensor | TimeRows, label: torch.Tensor, batch: int):
        """:meth:`_conditioning` for a given per-sample condition vector ``label`` (B, D) (a label's, a
        caption's or an observation's): time embedding plus it, once per distinct time ((B, N) times) or
        once per time row (:class:`TimeRows`, static shapes)."""
        if isinstance(t, TimeRows):
            if t.times.dim() != 2 or t.times.shape[0] != batch or t.index.shape != (batch, self.num_tokens):
                raise ValueError(f"TimeRows must hold times (B, K) and index (B, N) = ({batch}, {self.num_tokens}), "
                                 f"got {tuple(t.times.shape)} and {tuple(t.index.shape)}")
            return time_rows_conditioning(self.time_embed, t, label)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1:
            return self.time_embed(t) + label, None
        if t.shape != (batch, self.num_tokens):
            raise ValueError(f"per-token times must have shape (B, N) = ({batch}, {self.num_tokens}), got {tuple(t.shape)}")
        if not self.dedupe_times:
            rows = self.time_embed(t.reshape(-1)) + label.repeat_interleave(self.num_tokens, dim=0)
            return rows, torch.arange(batch * self.num_tokens, device=t.device).view(batch, self.num_tokens)
        times, sample, inverse = distinct_times(t)
        if times.shape[0] == batch:  # one time per sample (inference, mask ratio 0): exactly the (B,) path
            return self.time_embed(times) + label, None
        rows = self.time_embed(times) + label[sample]
        return rows, inverse

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | TimeRows,
        y=None,
        return_layers: Sequence[int] = (),
        stop_after: int | None = None,
    ):
        """Velocity (B, *sample_shape); with ``return_layers`` also {layer: hidden (B, N, D)}.

        Layers count from 1: layer l is the output of block l. ``stop_after=l`` runs blocks 1..l
        only and returns ``(None, hiddens)`` — the Self-Flow teacher needs nothing deeper.
        """
        B = x.shape[0]
        h = self.embed(x)  # (B, N, D)
        vector, context = self.condition_vector(y, B, x.device)
        cond, index = self.time_conditioning(t, vector, B)
        h, hiddens = self.run_blocks(h, (cond, index, *context), return_layers, stop_after)
        if h is None:
            return None, hiddens
        out = self.decode(h, cond, index)
        return (out, hiddens) if return_layers else out

    def run_blocks(self, h: torch.Tensor, block_args: tuple, return_layers: Sequence[int] = (),
                   stop_after: int | None = None) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Tokens through the blocks (each called as ``block(h, *block_args)``), keeping the hidden
        states of ``return_layers``; with ``stop_after=l`` returns ``(None, hiddens)`` after block l."""
        wanted = set(return_layers)
        if stop_after is not None:
            wanted.add(stop_after)
        for layer in wanted:
            if not 1 <= layer <= self.depth:
                raise ValueError(f"layer {layer} is outside 1..{self.depth}")
        hiddens: dict[int, torch.Tensor] = {}
        for number, block in enumerate(self.blocks, start=1):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = activation_checkpoint(block, h, *block_args, use_reentrant=False)
            else:
                h = block(h, *block_args)
            if number in wanted:
                hiddens[number] = h
            if stop_after is not None and number == stop_after:
                return None, hiddens
        return h, hiddens

    # ---- files ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, text: Optional[TextConfig] = None, modality: Optional[ModalityConfig] = None,
                        run: Optional[dict] = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``directory`` atomically. ``config.json`` holds
        the model and what rebuilds it: a caption model's text width and ``text`` section (its encoder), a
        token model's ``modality`` section (its layout and condition) and, when given, the run's config
        (whose sampler and data settings ``selfflow modality sample|eval`` read)."""
        from selfflow.files import atomic_directory, save_tensors, write_json

        if not self.patch_conv and modality is None:
            raise ValueError("save_pretrained of a token model needs the run's modality section (it rebuilds the layout)")
        meta: dict = {"model": asdict(self.config)}
        if self.conditions_on_text:
            meta["text_dim"] = self.text_dim
            if text is not None:
                meta["text"] = asdict(text)
        if modality is not None:
            meta["modality"] = asdict(modality)
        if run is not None:
            meta["run"] = run
        with atomic_directory(directory) as tmp:
            save_tensors(self.state_dict(), tmp / "model.safetensors")
            write_json(meta, tmp / "config.json")
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str = "model.safetensors", device: str | torch.device = "cpu") -> "DiT":
        """Load a folder written by :meth:`save_pretrained`, a training checkpoint or a run folder (its
        newest checkpoint), of any kind. ``weights="ema.safetensors"`` picks the EMA weights of a training
        checkpoint."""
        from selfflow.checkpoint import read_json, resolve_checkpoint

        directory = resolve_checkpoint(directory)
        return load_network(read_json(directory / "config.json"), directory / "config.json", directory / weights).to(device)


def TextDiT(config: ModelConfig, text_dim: int) -> DiT:
    """The caption-conditioned image model: ``DiT(config, condition=Condition("caption", dim=text_dim))``."""
    return DiT(config, condition=Condition("caption", dim=int(text_dim)))


def TokenDiT(config: ModelConfig, layout: Layout, cond_dim: int = 0, cond_image: Optional[tuple[int, int, int]] = None) -> DiT:
    """A token model: labels (``config.num_classes``), or with ``cond_dim > 0`` an observation vector."""
    condition = Condition("observation", dim=cond_dim, image=cond_image) if cond_dim else None
    return DiT(config, layout, condition)


def text_section(meta: dict, where: Path) -> Optional[TextConfig]:
    """The ``text`` section of a generator folder's config.json (top level or in ``run``); None: none."""
    raw = meta.get("text") or (meta.get("run") if isinstance(meta.get("run"), dict) else {}).get("text")
    return None if raw is None else from_dict(TextConfig, raw, f"{where}:text")


def modality_section(meta: dict, where: Path) -> Optional[ModalityConfig]:
    """The ``modality`` section of a generator folder's config.json (top level or in ``run``); None: none."""
    raw = meta.get("modality") or (meta.get("run") if isinstance(meta.get("run"), dict) else {}).get("modality")
    return from_dict(ModalityConfig, raw, f"{where}:modality") if isinstance(raw, dict) else None


def build_generator(config: ModelConfig, text: Optional[TextConfig] = None, modality: Optional[ModalityConfig] = None) -> DiT:
    """The generator of a run's sections: the layout of its ``modality`` (else the image of ``config``),
    conditioned on a caption when it has a ``text`` section, else on the modality's observation (a
    policy) or on class labels. A caption and a modality together make, e.g., a text-to-video model."""
    layout = condition = None
    if modality is not None:
        from selfflow.modalities.data import condition_dim, condition_image, layout_for

        layout = layout_for(modality)
        if condition_dim(modality):
            condition = Condition("observation", dim=condition_dim(modality), image=condition_image(modality))
    if text is not None:
        from selfflow.text.encoders import encoder_dim

        condition = Condition("caption", dim=encoder_dim(text.encoder, text.hashed_dim))
    return DiT(config, layout, condition)


def build_from_meta(meta: dict, where: Path) -> DiT:
    """The (untrained) generator a folder's ``config.json`` describes: its model section, with the layout
    and condition of its ``modality`` and ``text`` sections (:func:`build_generator`)."""
    from selfflow.checkpoint import CheckpointError

    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{where}: no 'model' section (not a selfflow model folder)")
    fields = {k: v for k, v in meta["model"].items() if k != "class_dropout_prob"}  # label dropout moved to the method config
    config = from_dict(ModelConfig, fields, f"{where}:model")
    return build_generator(config, text_section(meta, where), modality_section(meta, where))


def load_network(meta: dict, config_file: Path, weights_file: Path) -> DiT:
    """The generator ``config_file`` (read as ``meta``) describes, with ``weights_file`` loaded strictly (on the CPU)."""
    from selfflow.checkpoint import load_tensors

    model = build_from_meta(meta, config_file)
    state = load_tensors(weights_file, device="cpu")
    check_text_width(model, text_section(meta, config_file), state, config_file, weights_file)
    load_state_strict(model, state, weights_file)
    return model


def build_token_model(model: ModelConfig, modality: ModalityConfig) -> DiT:
    """The token model of a modality run (its layout and condition from the modality section)."""
    return build_generator(model, modality=modality)


def check_text_width(model: DiT, text: Optional[TextConfig], state: dict, config_file: Path, weights_file: Path) -> None:
    """A caption model's text section must give embeddings as wide as the ones the weights read (``text_proj``'s input)."""
    from selfflow.checkpoint import CheckpointError

    weight = state.get("text_proj.weight")
    if text is None or not model.conditions_on_text or weight is None or weight.ndim != 2 or weight.shape[1] == model.text_dim:
        return
    named = f"text.encoder={text.encoder}" + (f", text.hashed_dim={text.hashed_dim}" if text.encoder == "hashed" else "")
    raise CheckpointError(f"{config_file}: {named} gives {model.text_dim}-d caption embeddings, but {weights_file.name} reads "
                          f"{weight.shape[1]}-d ones; the text section is not the one the model was trained with")


GENERATOR_KINDS = ("image", "text", "modality")
WEIGHTS = ("ema", "model")


def read_kind(meta: dict) -> str:
    """What a generator folder's ``config.json`` describes, decided here only: ``"modality"`` (a
    ``modality`` section, top level or in ``run``), ``"text"`` (a ``text`` section), else ``"image"``."""
    run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    if meta.get("modality") or run.get("modality"):
        return "modality"
    if meta.get("text") or run.get("text"):
        return "text"
    return "image"


def open_folder(path: str | Path, weights: str = "ema") -> tuple[Path, dict, Path]:
    """(checkpoint folder, its config.json, the weights file) of a run, checkpoint or exported folder.

    ``weights``: ``ema`` or ``model`` of a training checkpoint; an exported folder holds one set
    (``model.safetensors``), used for either. Every generator loader starts here."""
    from selfflow.checkpoint import CheckpointError, read_json, resolve_checkpoint
    from selfflow.errors import ConfigError

    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    folder = resolve_checkpoint(path)
    meta = read_json(folder / "config.json")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{folder / 'config.json'}: no 'model' section (not a selfflow model folder)")
    file = folder / f"{weights}.safetensors"
    if not file.exists() and (folder / "model.safetensors").exists():
        file = folder / "model.safetensors"
    return folder, meta, file


def load_generator(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> tuple[DiT, Path]:
    """(DiT, folder) of an image model (class labels or none); ``selfflow.loader.load_model`` reads any kind."""
    folder, _meta, file = open_folder(path, weights)
    return DiT.from_pretrained(folder, weights=file.name, device=device), folder


def build_model(config: ModelConfig) -> DiT:
    """The image model of ``config`` (class labels; ``num_classes=0``: unconditional)."""
    return DiT(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

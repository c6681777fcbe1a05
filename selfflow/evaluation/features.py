"""Running a feature network over a set of images, batch by batch, with a progress bar.

A feature extractor is anything with ``features(images (B, C, H, W) in [−1, 1]) → (B, D)`` and a
``key`` dict naming it (the Inception extractor, the FD_dom feature net). Images come as one
tensor (N, C, H, W) or as an iterable of batches; ``extract_features`` keeps every feature,
``compute_stats`` only their running mean and covariance.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch

from .frechet import FeatureStats


class FeatureExtractor(Protocol):
    """Anything that maps images (B, C, H, W) in [−1, 1] to features (B, D) and names itself."""

    key: dict

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


def progress_bar(total: int | None, desc: str, unit: str = "img", enabled: bool = True):
    """A tqdm bar with a total and a rate (``unit``/s); a no-op object when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def iterate_batches(images: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield image batches from a tensor (N, C, H, W) or an iterable of batches.

    Items of an iterable may be tensors or tuples/lists whose first element is the images
    (as a DataLoader over (image, label) pairs gives).
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    for item in images:
        if isinstance(item, (tuple, list)):
            item = item[0]
        item = torch.as_tensor(item)
        if item.ndim == 3:
            item = item.unsqueeze(0)
        yield item


def image_count(images: Any) -> int | None:
    """The number of images in a tensor (N, C, H, W); None for an iterable of batches."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return int(images.shape[0])
    return None


def _batches(images: Any, batch_size: int, progress: bool, desc: str, total: int | None) -> Iterator[torch.Tensor]:
    """The batches of ``images``, counted in images on a progress bar of ``total`` images."""
    total = image_count(images) if total is None else total
    with progress_bar(total, desc, "img", progress) as bar:
        for batch in iterate_batches(images, batch_size):
            yield batch
            bar.update(int(batch.shape[0]))


@torch.inference_mode()
def extract_features(extractor: FeatureExtractor, images: Any, *, batch_size: int = 100,
                     progress: bool = False, desc: str = "features", total: int | None = None) -> torch.Tensor:
    """All features (N, D) float32 on the CPU. ``total``: the image count of an iterable (for the bar)."""
    out = [extractor.features(batch).float().cpu() for batch in _batches(images, batch_size, progress, desc, total)]
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)


@torch.inference_mode()
def compute_stats(extractor: FeatureExtractor, images: Any, *, batch_size: int = 100,
                  progress: bool = False, desc: str = "features", total: int | None = None) -> FeatureStats:
    """Streaming FeatureStats of the extractor's features; never holds all features at once."""
    stats: FeatureStats | None = None
    for batch in _batches(images, batch_size, progress, desc, total):
        feats = extractor.features(batch)
        stats = FeatureStats(dim=feats.shape[1]) if stats is None else stats
        stats.update(feats)
    if stats is None:
        raise ValueError("no images given")
    return stats


def iterate(items: Iterable, total: int, desc: str, unit: str, enabled: bool) -> Iterator:
    """``items`` on a progress bar of ``total`` ``unit``s, one per item."""
    with progress_bar(total, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)

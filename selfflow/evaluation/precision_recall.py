"""Improved precision and recall with k-NN manifolds (Kynkäänniemi et al., NeurIPS 2019).

Each set of features defines a manifold: the union of balls around its points, each ball's radius
the distance to that point's k-th nearest neighbour within the same set (k = 3 in the paper).

    precision = fraction of fake points inside the real manifold   (eq. 1–2: f(φ_g, Φ_r))
    recall    = fraction of real points inside the fake manifold   (f(φ_r, Φ_g))

Distances are computed with ``torch.cdist`` in row chunks, so memory is O(batch · N).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .features import progress_bar


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_features(x: torch.Tensor, name: str, device: torch.device | None) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {tuple(x.shape)}")
    return x.to(device or x.device, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)


def knn_radii(features: torch.Tensor, k: int = 3, batch: int = 1000, bar=None) -> torch.Tensor:
    """Distance from each point (N, D) to its k-th nearest neighbour in the same set, itself excluded → (N,)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = []
    for start in range(0, n, batch):
        d = torch.cdist(features[start:start + batch], features)            # (b, N)
        # the point itself is at distance 0 and is the smallest; the k-th neighbour is index k
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
        if bar is not None:
            bar.update(d.shape[0])
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int, bar=None) -> float:
    """Fraction of query points within radii[j] of at least one support point j."""
    inside = 0
    for start in range(0, queries.shape[0], batch):
        d = torch.cdist(queries[start:start + batch], support)               # (b, M)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
        if bar is not None:
            bar.update(d.shape[0])
    return inside / queries.shape[0]


@torch.inference_mode()
def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3,
                     batch: int = 1000, device: str | torch.device | None = None,
                     progress: bool = False, real_radii: torch.Tensor | None = None) -> PrecisionRecall:
    """k-NN precision and recall of fake (M, D) against real (N, D) features; both in [0, 1].

    ``progress``: one bar over the four passes (radii of each set, coverage of each), 2·(N + M) rows.
    ``real_radii``: ``knn_radii(real_features, k)`` computed once for many fake sets (the N² pass)."""
    real = _as_features(real_features, "real_features", torch.device(device) if device else None)
    fake = _as_features(fake_features, "fake_features", real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    fake = fake.to(real.dtype)
    with progress_bar(2 * (real.shape[0] + fake.shape[0]), "precision/recall", "row", progress) as bar:
        if real_radii is None:
            real_radii = knn_radii(real, k, batch, bar)
        else:
            if real_radii.shape != (real.shape[0],):
                raise ValueError(f"real_radii has shape {tuple(real_radii.shape)}, expected ({real.shape[0]},)")
            real_radii = real_radii.to(real.device, real.dtype)
            if bar is not None:
                bar.update(real.shape[0])
        fake_radii = knn_radii(fake, k, batch, bar)
        return PrecisionRecall(precision=_coverage(fake, real, real_radii, batch, bar),
                               recall=_coverage(real, fake, fake_radii, batch, bar))

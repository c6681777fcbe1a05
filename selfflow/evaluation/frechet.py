"""The Fréchet distance between two Gaussians and the streaming statistics it is computed from.

The Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, eq. 6; Dowson &
Landau 1982) is

    d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}).

FID is that distance between Inception-v3 pool features (``inception.py``); FD_dom is the same
distance in the feature space of the project's own classifier (``feature_net.py``). Everything
here runs in float64.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch

from selfflow.files import atomic_file

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------
def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mean {mu.shape} and covariance {sigma.shape} do not match (want (D,), (D, D))")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mean or covariance contains NaN or inf")


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root through an eigendecomposition (round-off eigenvalues → 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_clip_round_off(w))) @ v.T


def _clip_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Set eigenvalues below the float64 resolution of the spectrum (D·eps·max|λ|) to zero.

    A rank-deficient covariance (fewer samples than dimensions) has exact zero eigenvalues that
    come out as ±round-off; √ would magnify them (√1e-14 = 1e-7 each), so they are zeroed."""
    tol = eigenvalues.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(eigenvalues).max(initial=0.0)), 1e-300)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _psd_eigen(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero eigenpairs (w (r,), V (D, r)) of a symmetric PSD matrix, round-off dropped."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    keep = _clip_round_off(w) > 0
    return w[keep], v[:, keep]


def _trace_sqrt_product_svd(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}) as the nuclear norm of A = Σ2^{1/2} Σ1^{1/2}.

    AᵀA = Σ1^{1/2} Σ2 Σ1^{1/2}, so the singular values of A are the square roots of that matrix's
    eigenvalues and their sum is the trace we want. With Σk = Vk diag(wk) Vkᵀ (non-zero part,
    rank rk), A = V2 B V1ᵀ with B = diag(√w2) V2ᵀ V1 diag(√w1), and V1, V2 have orthonormal
    columns, so the singular values of the small r2 × r1 matrix B are those of A (fast when
    n < D makes the covariances rank-deficient). Working with A instead of AᵀA avoids squaring
    the condition number: for an ill-conditioned covariance (eigenvalues down to 1e-7 of the
    largest, common for network features) the symmetric-product route loses ~1e-6 absolute
    accuracy and √ of null-space round-off adds ~1e-8 relative; this route keeps ~1e-13.
    """
    w1, v1 = _psd_eigen(sigma1)
    w2, v2 = _psd_eigen(sigma2)
    if w1.size == 0 or w2.size == 0:
        return 0.0
    b = (np.sqrt(w2)[:, None] * (v2.T @ v1)) * np.sqrt(w1)[None, :]
    return float(np.linalg.svd(b, compute_uv=False).sum())


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}) from the eigenvalues of the symmetric PSD product.

    Σ1 Σ2 is similar to M = Σ1^{1/2} Σ2 Σ1^{1/2}, so both have the same real, non-negative
    eigenvalues λ_i and the trace is Σ_i √λ_i; negative λ_i are round-off and count as 0.
    """
    sqrt_sigma1 = _psd_sqrt(sigma1)
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr(sqrtm(Σ1 Σ2)) with scipy's general matrix square root, guarded as in the reference FID code."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: sqrtm(Σ1 Σ2) is not finite (singular product); "
                       "retrying with %g added to both covariance diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag_diag = float(np.abs(np.diagonal(covmean).imag).max())
        if max_imag_diag > 1e-3:
            raise ValueError(
                f"Fréchet distance: sqrtm(Σ1 Σ2) has an imaginary diagonal part of {max_imag_diag:.3g} "
                "(> 1e-3); the covariances are probably not PSD or far too few samples were used. "
                "method='svd' needs no complex arithmetic.")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, method: str = "svd",
                     eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    mu: (D,), sigma: (D, D). Methods for the trace term (all equal in exact arithmetic):
    ``"svd"`` (default): nuclear norm of Σ2^{1/2} Σ1^{1/2}, the most accurate, also when n < D
    makes the covariances singular; ``"eigh"``: eigenvalues of Σ1^{1/2} Σ2 Σ1^{1/2};
    ``"sqrtm"``: the classic ``scipy.linalg.sqrtm(Σ1 Σ2)`` with the usual guards (eps·I retry
    when not finite, error on a non-negligible imaginary part).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_gaussian(mu1, sigma1, "first")
    _check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    if method == "svd":
        tr_covmean = _trace_sqrt_product_svd(sigma1, sigma2)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"unknown method {method!r}; use 'svd', 'eigh' or 'sqrtm'")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    if not np.isfinite(value):
        raise FloatingPointError(f"Fréchet distance is not finite ({value})")
    return value


# --------------------------------------------------------------------------------------------
# streaming statistics
# --------------------------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """Mean and covariance of features, accumulated batch by batch in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and centred sum of outer
    products), which avoids the cancellation of Σxxᵀ − nμμᵀ. ``sigma`` is the unbiased
    covariance (divides by count − 1, as ``np.cov``).
    """

    dim: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # (D,) float64
    m2: np.ndarray = field(default=None)    # (D, D) float64, Σ (x − μ)(x − μ)ᵀ

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, np.float64)
        if self.m2 is None:
            self.m2 = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> "FeatureStats":
        """Add a batch of features (B, D)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        return self.m2 / (self.count - 1)

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> "FeatureStats":
        return cls(dim=int(features.shape[1])).update(features)

    def frechet_distance(self, other: "FeatureStats", **kwargs: Any) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, **kwargs)

    def save(self, path: str | Path) -> None:
        """Write mu, sigma and count to an .npz file (atomically)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.asarray(self.count, np.int64)}
        with atomic_file(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        with np.load(Path(path), allow_pickle=False) as data:
            mu, sigma, count = data["mu"], data["sigma"], int(data["count"])
        return cls(dim=mu.shape[0], count=count, mean=mu.astype(np.float64),
                   m2=sigma.astype(np.float64) * (count - 1))

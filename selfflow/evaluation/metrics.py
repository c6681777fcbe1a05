"""One call that evaluates a set of generated images and records every protocol field.

``evaluate(images, labels, reference=..., feature_net_dir=..., inception_path=...)`` returns a
JSON-ready dict with FD_dom, k-NN precision/recall, class-conditional accuracy and FID, plus what
the project records with every figure (docs/methods.md#evaluation): generated and reference counts,
the reference set's identity (name, split, selection, content hash), the Inception weight hash,
resize filter and quantisation, the feature net's hash, library versions and the device.
The sampler's own fields (solver, evaluations per image, guidance scale, seeds) come from the
caller through ``sampling=``; ``measure_sampler_speed`` measures wall time per image.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import scipy
import torch

from .feature_net import FeatureNet, conditional_accuracy, load_feature_net
from .features import compute_stats, extract_features
from .inception import INCEPTION_SIZE, load_inception
from .stats_cache import reference_stats
from .precision_recall import precision_recall

logger = logging.getLogger(__name__)

METRICS = ("fd_dom", "pr", "acc", "fid")
PROTOCOL = "selfflow.eval/1"


# --------------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_sampler_speed(generate_fn: Callable[[int], Any], n: int, warmup: int = 1, *,
                          device: str | torch.device | None = None) -> dict:
    """Wall time per image of ``generate_fn(n)`` after ``warmup`` untimed calls of the same size.

    ``generate_fn(num_samples)`` may return anything; if the result has ``nfe_per_sample`` (as
    ``selfflow.sampling.generate``'s does) it is reported too. ``device``: a CUDA device is
    synchronised before and after the timed call so queued kernels are counted. For example::

        measure_sampler_speed(lambda k: generate(model, num_samples=k, image_shape=(1, 28, 28),
                                                 sampler="euler", steps=50, device="cuda"),
                              n=256, device="cuda")
    """
    if n < 1 or warmup < 0:
        raise ValueError(f"need n >= 1 and warmup >= 0, got n={n}, warmup={warmup}")
    dev = torch.device(device) if device is not None else None
    for _ in range(warmup):
        generate_fn(n)
    _sync(dev)
    start = time.perf_counter()
    result = generate_fn(n)
    _sync(dev)
    seconds = time.perf_counter() - start
    report = {"num_images": n, "warmup_calls": warmup, "total_seconds": seconds,
              "seconds_per_image": seconds / n, "images_per_second": n / seconds if seconds > 0 else float("inf")}
    nfe = getattr(result, "nfe_per_sample", None)
    if nfe is not None:
        report["nfe_per_sample"] = float(nfe)
    return report


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: str | torch.device) -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "device": str(torch.device(device)), "device_name": device_name(device),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------
# reference data
# --------------------------------------------------------------------------------------------
class _Reference:
    """A uniform view of a reference set: an ImageDataset-like object (``get_batch``, ``len``),
    a tensor (N, C, H, W), or a tuple (images, labels); the first ``count`` images are used."""

    def __init__(self, reference: Any, count: int | None, key: dict | None) -> None:
        if reference is None:
            raise ValueError("these metrics need a reference set (reference=...)")
        self.source = reference
        if hasattr(reference, "get_batch") and hasattr(reference, "__len__"):
            total = len(reference)
            self._get = lambda lo, hi: reference.get_batch(torch.arange(lo, hi))[0]
            base = {"name": getattr(reference, "name", type(reference).__name__),
                    "split": getattr(reference, "split", None)}
        else:
            images = reference[0] if isinstance(reference, (tuple, list)) else reference
            images = torch.as_tensor(images)
            if images.ndim != 4:
                raise ValueError(f"reference images must be (N, C, H, W), got {tuple(images.shape)}")
            total = images.shape[0]
            self._get = lambda lo, hi: images[lo:hi].float()
            base = {"name": "tensor", "split": None}
        self.count = total if count is None else int(count)
        if not 2 <= self.count <= total:
            raise ValueError(f"asked for {self.count} reference images, the set has {total} (need ≥ 2)")
        base.update(key or {})
        base.update({"count": self.count, "selection": "first count images, in the set's order",
                     "content_sha256": self._content_hash()})
        self.key = base

    def batches(self, batch_size: int = 500) -> Iterator[torch.Tensor]:
        for lo in range(0, self.count, batch_size):
            yield self._get(lo, min(lo + batch_size, self.count))

    def tensor(self, count: int | None = None) -> torch.Tensor:
        count = self.count if count is None else count
        return torch.cat([self._get(lo, min(lo + 2000, count)) for lo in range(0, count, 2000)])

    def _content_hash(self) -> str:
        """sha256 of the float32 images as the evaluation sees them: ties a cache to the data itself."""
        h = hashlib.sha256()
        for batch in self.batches(2000):
            h.update(str(tuple(batch.shape[1:])).encode())
            h.update(batch.to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def evaluate(images: torch.Tensor, labels: torch.Tensor | None = None, *,
             metrics: Sequence[str] = METRICS, reference: Any = None, reference_key: dict | None = None,
             num_reference: int | None = None, feature_net_dir: str | Path | FeatureNet | None = None,
             inception_path: str | Path | None = None, n: int | None = None,
             device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
             pr_k: int = 3, pr_max_count: int = 10000, batch_size: int | None = None,
             sampling: dict | None = None, progress: bool = True) -> dict:
    """Evaluate generated ``images`` (N, C, H, W) in [−1, 1] against ``reference``.

    metrics: any of ``"fd_dom"`` (Fréchet distance in the feature net's 128-d space), ``"pr"``
    (k-NN precision/recall, in the feature net's space, on min(N, N_ref, pr_max_count) images of
    each set), ``"acc"`` (feature-net accuracy of the generated images on ``labels``, the classes
    they were generated for), ``"fid"`` (Inception FID). n: use the first n generated images.
    reference_key: identity fields for the cache (e.g. ``{"name": "mnist", "split": "train"}``);
    an ImageDataset supplies name and split itself, and a content hash is always added.
    cache_dir: where reference statistics are cached (None: no cache). sampling: the sampler's
    fields (solver, steps, nfe_per_sample, cfg_scale, seeds …), copied into the report.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(METRICS)}")
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if n is not None:
        if n > images.shape[0]:
            raise ValueError(f"n={n} but only {images.shape[0]} images were given")
        images = images[:n]
        labels = None if labels is None else labels[:n]
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    device = torch.device(device)
    if not torch.isfinite(images).all():
        raise ValueError("generated images contain NaN or inf")
    out_of_range = float((images.abs() > 1.0 + 1e-4).float().mean())

    report: dict[str, Any] = {"protocol": PROTOCOL, "metrics": list(metrics), "num_generated": int(images.shape[0]),
                              "generated_fraction_outside_[-1,1]": out_of_range,
                              "frechet_method": "svd", "sampling": dict(sampling or {}), "timings_s": {}}
    ref = _Reference(reference, num_reference, reference_key)
    report["reference"] = ref.key
    report["num_reference"] = ref.count

    net = None
    if {"fd_dom", "pr", "acc"} & set(metrics):
        if feature_net_dir is None:
            raise ValueError("fd_dom, pr and acc need the feature net (feature_net_dir=...); "
                             "train one with selfflow.evaluation.train_feature_net")
        if isinstance(feature_net_dir, FeatureNet):
            net, net_path = feature_net_dir.to(device).eval(), None
        else:
            net, net_path = load_feature_net(feature_net_dir, device), str(feature_net_dir)
        report["feature_net"] = {"path": net_path, **net.key}
    fn_batch = batch_size or 1000

    if "fd_dom" in metrics:
        t0 = time.perf_counter()
        ref_stats = reference_stats(ref.key, lambda: ref.batches(fn_batch), net, cache_dir,
                                    batch_size=fn_batch, progress=progress, total=ref.count)
        gen_stats = compute_stats(net, images, batch_size=fn_batch, progress=progress, desc="generated (feature net)")
        report["fd_dom"] = gen_stats.frechet_distance(ref_stats)
        report["timings_s"]["fd_dom"] = time.perf_counter() - t0

    if "pr" in metrics:
        t0 = time.perf_counter()
        count = min(images.shape[0], ref.count, pr_max_count)
        with torch.inference_mode():
            real = extract_features(net, ref.tensor(count), batch_size=fn_batch, progress=progress,
                                    desc="reference (precision/recall)")
            fake = extract_features(net, images[:count], batch_size=fn_batch, progress=progress,
                                    desc="generated (precision/recall)")
        pr = precision_recall(real, fake, k=pr_k, device=device, progress=progress)
        report.update({"precision": pr.precision, "recall": pr.recall, "pr_k": pr_k, "pr_count": int(count),
                       "pr_feature_space": "feature_net"})
        report["timings_s"]["pr"] = time.perf_counter() - t0

    if "acc" in metrics:
        if labels is None:
            report["accuracy"] = None
            report["accuracy_note"] = "no labels given (unconditional samples)"
        else:
            acc, per_class = conditional_accuracy(net, images, labels)
            report["accuracy"] = acc
            report["per_class_accuracy"] = {str(c): a for c, a in per_class.items()}

    if "fid" in metrics:
        t0 = time.perf_counter()
        inception = load_inception(inception_path, device)
        inc_batch = batch_size or (200 if device.type == "cuda" else 50)
        ref_stats = reference_stats(ref.key, lambda: ref.batches(inc_batch), inception, cache_dir,
                                    batch_size=inc_batch, progress=progress, total=ref.count)
        gen_stats = compute_stats(inception, images, batch_size=inc_batch, progress=progress, desc="generated (inception)")
        report["fid"] = gen_stats.frechet_distance(ref_stats)
        report["inception"] = {"path": str(inception.path), "weights_name": inception.weights_name, **inception.key}
        report["resize_filter"] = inception.key["resize_filter"]
        report["inception_input_size"] = INCEPTION_SIZE
        report["timings_s"]["fid"] = time.perf_counter() - t0

    report["environment"] = environment_info(device)
    return report
